"""Orbax checkpoints of a run: train state, config, data iterator position.

One checkpoint step holds three items:
  state   the train state pytree (StandardSave; restored through abstract
          arrays that carry the target shardings, so a run saved on 8 devices
          restores on 1 and back);
  config  the run's config as JSON, so a workdir describes itself;
  data    the grain iterator state of each process, so a resumed run reads
          the very batches it would have read.
The manager keeps the latest `keep` steps plus the one with the lowest eval loss.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

BEST_METRIC = "eval_loss"


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Shape/dtype placeholders of `tree`, all placed with `sharding`."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


class Checkpointer:
  """A `CheckpointManager` over `directory` with the items above."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3,
               read_only: bool = False):
    self.directory = epath.Path(directory).absolute()
    if read_only and not self.directory.exists():
      raise FileNotFoundError(f"no checkpoint directory at {self.directory}")
    preservation = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.BestN(
            get_metric_fn=lambda metrics: metrics[BEST_METRIC],
            reverse=True,  # Sorted high to low; the last (lowest) one is kept.
            n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation, create=not read_only,
        read_only=read_only, enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, config: dict[str, Any],
           data_iterator: grain.DatasetIterator | None = None,
           metrics: dict[str, float] | None = None) -> None:
    items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def restore(self, step: int, abstract_state: Any,
              data_iterator: grain.DatasetIterator | None = None) -> Any:
    """The state at `step`, laid out as `abstract_state` says; moves
    `data_iterator` (in place) to where it was when the step was saved."""
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self._manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def restore_config(self, step: int | None = None) -> dict[str, Any]:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return self._manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def reached_preemption(self, step: int) -> bool:
    """Whether JAX's multi-host preemption notice has reached every process
    (all hosts must save the same step together, so a local SIGTERM alone
    cannot decide it)."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
