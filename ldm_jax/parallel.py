"""Everything about devices in one place: the mesh, the shardings, multi-host start-up.

ldm-jax is data parallel. One global mesh spans every device of every process
with a single axis, ``data``. Batches are split along that axis; parameters,
optimizer state and EMA are replicated. Each process feeds only its own slice
of the global batch, and `shard_batch` stitches the slices into one global
`jax.Array` without any cross-host copy.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(enabled: bool | None = None) -> None:
  """Starts multi-host JAX when asked for, before any device is touched.

  `enabled=None` reads the environment variable `LDM_JAX_DISTRIBUTED` ("1" to
  start). On Cloud TPU, SLURM and Open MPI, `jax.distributed.initialize()`
  discovers the coordinator by itself; elsewhere set JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  """
  if enabled is None:
    enabled = os.environ.get("LDM_JAX_DISTRIBUTED", "0") == "1"
  if not enabled:
    return
  jax.distributed.initialize()
  logging.info(
      "process %d of %d, %d local / %d global devices",
      jax.process_index(), jax.process_count(),
      jax.local_device_count(), jax.device_count())


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (default: all of them).

  The axis is Auto rather than Explicit (the `make_mesh` default) because the
  whole program is classic data parallelism: shardings are fixed at the jit
  boundary and XLA propagates them, so no function needs sharding-typed code.
  """
  devices = jax.devices()
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise ValueError(
          f"asked for {num_devices} devices, but only {len(devices)} exist")
    devices = devices[:num_devices]
  return jax.make_mesh(
      (len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
      devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over `data`, the rest whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Returns the per-process batch size, or a clear error if it is not whole."""
  num_devices = mesh.devices.size
  if global_batch_size <= 0 or global_batch_size % num_devices:
    raise ValueError(
        f"the global batch size ({global_batch_size}) must be a positive "
        f"multiple of the number of devices ({num_devices}); pick e.g. "
        f"{max(num_devices, global_batch_size // num_devices * num_devices)}")
  return global_batch_size // jax.process_count()


def shard_batch(mesh: Mesh, local_batch: Any) -> Any:
  """Assembles each process's slice of the batch into global arrays."""
  sharding = batch_sharding(mesh)

  def to_global(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(to_global, local_batch)


def replicate(mesh: Mesh, tree: Any) -> Any:
  """Places a host pytree on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def gather_to_host(tree: Any) -> Any:
  """Brings (possibly multi-host) global arrays back as full numpy arrays."""
  from jax.experimental import multihost_utils
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  return multihost_utils.process_allgather(tree, tiled=True)
