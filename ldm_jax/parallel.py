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


# The names users set by hand when no cluster manager describes the job.
# jax.distributed.initialize() reads only the first itself.
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
# Seconds without a heartbeat after which JAX declares a process dead and
# stops the others (JAX's default is 100).
HEARTBEAT_TIMEOUT_ENV = "LDM_JAX_HEARTBEAT_TIMEOUT"


def _int_from_env(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not an integer") from None


def distributed_arguments() -> dict[str, Any]:
  """The arguments `initialize_distributed` passes to JAX, from the environment.

  Values that are not set stay None, which lets JAX discover them from the
  cluster (Cloud TPU metadata, SLURM or Open MPI variables).
  """
  arguments: dict[str, Any] = {
      "coordinator_address": os.environ.get(COORDINATOR_ENV) or None,
      "num_processes": _int_from_env(NUM_PROCESSES_ENV),
      "process_id": _int_from_env(PROCESS_ID_ENV),
  }
  heartbeat = _int_from_env(HEARTBEAT_TIMEOUT_ENV)
  if heartbeat is not None:
    arguments["heartbeat_timeout_seconds"] = heartbeat
  return arguments


def initialize_distributed(enabled: bool | None = None) -> None:
  """Starts multi-process JAX when asked for, before any device is touched.

  `enabled=None` reads the environment variable `LDM_JAX_DISTRIBUTED` ("1" to
  start). JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES
  and JAX_PROCESS_ID describe the job by hand; whatever is unset is
  discovered on Cloud TPU, SLURM and Open MPI.
  """
  if enabled is None:
    enabled = os.environ.get("LDM_JAX_DISTRIBUTED", "0") == "1"
  if not enabled:
    return
  arguments = distributed_arguments()
  try:
    jax.distributed.initialize(**arguments)
  except ValueError as error:
    given = {k: v for k, v in arguments.items() if v is not None}
    raise ValueError(
        f"cannot start the distributed run ({error}). Outside Cloud TPU, "
        f"SLURM and Open MPI set all of {COORDINATOR_ENV} (host:port of "
        f"process 0), {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV}; given: "
        f"{given or 'none'}") from error
  logging.info(
      "process %d of %d, %d local / %d global devices",
      jax.process_index(), jax.process_count(),
      jax.local_device_count(), jax.device_count())


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (default: all of them).

  The axis is Auto rather than Explicit (the `jax.make_mesh` default) because
  the whole program is classic data parallelism: shardings are fixed at the
  jit boundary and XLA propagates them, so no function needs sharding-typed
  code. The device order is kept as given (grouped by process) rather than
  left to `jax.make_mesh`, which may reorder devices for the interconnect.
  """
  # Grouped by process, so that each process's devices hold one contiguous
  # block of the batch: process p's rows are [p * B / P, (p + 1) * B / P),
  # which is what the data pipeline gives it.
  devices = sorted(jax.devices(), key=lambda d: d.process_index)
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise ValueError(
          f"asked for {num_devices} devices, but only {len(devices)} exist")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


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


def map_in_batches(fn: Any, inputs: np.ndarray, batch_size: int, mesh: Mesh,
                   progress: Any = None) -> np.ndarray:
  """`fn` over the rows of `inputs` in global batches split over `mesh`.

  Every process passes the same full `inputs` and gets the full result back,
  rows in the order of `inputs`. `batch_size` is rounded up to a multiple of
  the device count; the last batch is padded and the padding dropped.
  `progress`, if given, is called with the number of rows each batch finished.
  """
  num_devices = mesh.devices.size
  batch_size = -(-batch_size // num_devices) * num_devices
  local = batch_size // jax.process_count()
  own_rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
  results, pending = [], None
  for start in range(0, len(inputs), batch_size):
    chunk = inputs[start:start + batch_size]
    valid = len(chunk)
    if valid < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - valid,) + chunk.shape[1:],
                                              chunk.dtype)])
    result = fn(shard_batch(mesh, chunk[own_rows]))
    # Fetch the previous batch only after queueing this one, so the devices
    # never wait for the host copy.
    if pending is not None:
      results.append(gather_to_host(pending[0])[:pending[1]])
      if progress is not None:
        progress(pending[1])
    pending = (result, valid)
  if pending is not None:
    results.append(gather_to_host(pending[0])[:pending[1]])
    if progress is not None:
      progress(pending[1])
  return np.concatenate(results)
