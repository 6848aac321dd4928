"""Orbax checkpoints of a run: train state, config, data iterator position.

One checkpoint step holds three items:
  state   the train state pytree (StandardSave; restored through abstract
          arrays that carry the target shardings, so a run saved on 8 devices
          restores on 1 and back);
  config  the run's config as JSON, so a workdir describes itself;
  data    the grain iterator state of each process (one file per process),
          so a resumed run reads the very batches it would have read, also
          on another number of processes (see `_DataIteratorHandler`).
The manager keeps the latest `keep` steps plus the one with the lowest eval loss,
and every step in `keep_steps`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

BEST_METRIC = "eval_loss"


class CheckpointReadError(OSError):
  """A saved step that cannot be restored; the message names it, its
  directory and the cause in a line."""

  def __init__(self, step: int, path: str | os.PathLike, cause: str):
    super().__init__(f"checkpoint step {step} in {path} cannot be read: {cause}")
    self.step, self.path, self.cause = step, str(path), cause


class _DataIteratorHandler(grain.checkpoint.CheckpointHandler):
  """grain's handler (each process saves `process_<i>-of-<n>.json`), which also
  restores a checkpoint written by a different number of processes.

  The train stream's state is a position in the global stream
  (ldm_jax.data.pipeline), the same in every process's file; a process with no
  file of its own takes that common state, and refuses if the files differ.
  """

  def restore(self, directory, item=None, args=None):
    item = item or args.item
    index, count = jax.process_index(), jax.process_count()
    if (directory / f"process_{index}-of-{count}.json").exists():
      return super().restore(directory, item=item, args=args)
    saved = sorted(directory.glob("process_*-of-*.json"))
    states = {path.read_text() for path in saved}
    if len(states) != 1:
      raise ValueError(
          f"cannot resume the data stream on {count} process(es): {directory} holds "
          f"{'no iterator state' if not saved else 'different states per process'} "
          f"({', '.join(p.name for p in saved) or 'no files'}); rerun on the process "
          "count that wrote it")
    item.set_state(json.loads(states.pop()))
    item.start_prefetch()
    return item


@ocp.args.register_with_handler(_DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(_DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
  item: Any


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Shape/dtype placeholders of `tree`, all placed with `sharding`."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


class Checkpointer:
  """A `CheckpointManager` over `directory` with the items above."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3,
               keep_steps: Sequence[int] = (), read_only: bool = False):
    self.directory = epath.Path(directory).absolute()
    if read_only and not self.directory.exists():
      raise FileNotFoundError(f"no checkpoint directory at {self.directory}")
    preservation = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=keep),
        checkpoint_managers.CustomSteps(steps=list(keep_steps)),
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
      items["data"] = _DataSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def restore(self, step: int, abstract_state: Any,
              data_iterator: grain.DatasetIterator | None = None) -> Any:
    """The state at `step`, laid out as `abstract_state` says; moves
    `data_iterator` (in place) to where it was when the step was saved."""
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iterator is not None:
      items["data"] = _DataRestore(data_iterator)
    return self._read(step, items)["state"]

  def restore_config(self, step: int | None = None) -> dict[str, Any]:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return self._read(step, dict(config=ocp.args.JsonRestore()))["config"]

  def step_directory(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def _read(self, step: int, items: dict[str, Any]) -> Any:
    """Restores `items` of `step`; any failure (a damaged or truncated file,
    a missing item) becomes a `CheckpointReadError` that says where and why."""
    step_dir = self.step_directory(step)
    try:
      with _unretrieved_errors_silenced():
        return self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointReadError(step, step_dir, describe_read_failure(e, step_dir)) from e

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


@contextlib.contextmanager
def _unretrieved_errors_silenced():
  """Keeps the asyncio logger quiet while a restore fails: orbax reads every
  array in its own task, and when one fails each other failed task's error is
  logged with its traceback as it is garbage collected, hundreds of lines
  repeating the one error that is raised anyway."""
  logger = logging.getLogger("asyncio")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    gc.collect()
    logger.setLevel(level)


# Where TensorStore names the file it failed on, and the spec dump it appends.
_TENSORSTORE_FILE = re.compile(r'local file "([^"]+)"')
_TENSORSTORE_SPEC = re.compile(r"\s*\[(?:tensorstore_spec|source locations)")
_MAX_CAUSE_CHARS = 300


def describe_read_failure(error: BaseException, step_dir: epath.Path) -> str:
  """One line on why a step could not be read: the file, if one can be
  named, and what is wrong with it."""
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  text = _TENSORSTORE_SPEC.split(text, maxsplit=1)[0]
  files = _TENSORSTORE_FILE.findall(text)
  if files:
    # TensorStore's message nests driver contexts; what follows the deepest
    # file is the failure itself (e.g. a checksum or decompression error).
    last = files[-1]
    cause = text[text.rindex(f'local file "{last}"') + len(last) + 13:].lstrip(": ")
    return _shorten(f"{_relative(last, step_dir)}: {cause or text}")
  broken = _first_unparsable_json(step_dir)
  if broken is not None:
    return _shorten(f"{_relative(broken, step_dir)}: {type(error).__name__}: {text}")
  return _shorten(f"{type(error).__name__}: {text}")


def _relative(path: str | os.PathLike, root: epath.Path) -> str:
  try:
    return os.path.relpath(os.fspath(path), os.fspath(root))
  except ValueError:
    return os.fspath(path)


def _shorten(text: str) -> str:
  return text if len(text) <= _MAX_CAUSE_CHARS else text[:_MAX_CAUSE_CHARS - 3] + "..."


def _first_unparsable_json(step_dir: epath.Path) -> str | None:
  """The first metadata file of a step that is not valid JSON (orbax's JSON
  errors do not say which file they read)."""
  root = os.fspath(step_dir)
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d != "d" and not d.startswith("ocdbt."))
    for name in sorted(files):
      path = os.path.join(directory, name)
      if name.endswith((".txt", ".ocdbt")) or name == "_sharding":
        continue
      try:
        with open(path, encoding="utf-8") as f:
          json.load(f)
      except (ValueError, OSError):
        return path
  return None
