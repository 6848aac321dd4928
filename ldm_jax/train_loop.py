"""The one training loop, shared by every stage.

  state  <- restore latest checkpoint of workdir, or initialise
  stage.prepare_training (e.g. the LDM's latent cache)
  repeat: batch -> stage.train_batch -> jit train step (donated state) -> metrics
          every log_every:        progress bar, stdout, metrics.jsonl, TensorBoard
          every eval_every:       eval metrics on the test split + picture (+ FID)
          every checkpoint_every: orbax checkpoint with the data iterator
                                  (and at each of train.keep_steps, kept for good)
  SIGTERM (preemption) -> checkpoint, then exit; a NaN/Inf loss -> stop, last
  good checkpoint kept.

Reliability rules: nothing in the workdir changes until the config has been
checked and the state restored (or initialised); a checkpoint that cannot be
read is reported and the newest readable one is used; a state is saved only
once its own loss and parameters are seen finite; and the metrics log keeps
each step once, whatever crashes happened between.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from ldm_jax import (checkpoint, config as config_lib, data, files, images, parallel, runs,
                     train_state)
from ldm_jax.metric_writer import MetricWriter


# Where checkpoint steps that could not be read are moved once an older one
# has been restored, so that the run can save those steps again.
UNREADABLE_DIR = "checkpoints_unreadable"


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the message says which checkpoint is intact."""


class NoReadableCheckpointError(OSError):
  """Every saved step of a workdir failed to restore; the message says what to do."""


class _Preemption:
  """Turns SIGTERM into a flag that the loop polls between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() > 1:
      # jax.distributed's preemption notifier owns SIGTERM there (the loop
      # asks orbax); a Python handler would replace it and no process would
      # ever hear of the notice.
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: leave signals alone.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def check_workdir_path(workdir: str) -> None:
  """A clear error when `workdir` names a file, before anything is written."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(
        f"--workdir {workdir} is a file, not a directory; give a new directory "
        "or the workdir of an earlier run")


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    tqdm.write(f"warning: {message}", file=sys.stderr)


def _open_saved(workdir: str) -> checkpoint.Checkpointer | None:
  """The workdir's checkpoints, opened read-only (None if there are none):
  validation must not create anything."""
  directory = runs.checkpoint_dir(workdir)
  if not os.path.exists(directory):
    return None
  if not os.path.isdir(directory):
    raise NotADirectoryError(f"{directory} is a file; a workdir keeps its checkpoints there")
  return checkpoint.Checkpointer(directory, read_only=True)


def _check_workdir_config(workdir: str, config: ml_collections.ConfigDict,
                          saved: checkpoint.Checkpointer | None) -> None:
  """Refuses a config the workdir's run cannot resume with, checked against
  the newest checkpoint whose config can be read, else config.json."""
  for step in sorted(saved.all_steps() if saved else [], reverse=True):
    try:
      saved_config = saved.restore_config(step)
    except checkpoint.CheckpointReadError:
      continue  # Reported when the state is restored.
    config_lib.check_resumable(saved_config, config,
                               f"checkpoint step {step} in {saved.directory}")
    return
  saved_path = os.path.join(workdir, "config.json")
  if os.path.exists(saved_path):
    with open(saved_path) as f:
      config_lib.check_resumable(json.load(f), config, saved_path)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  # One reduction over the concatenated leaves of each dtype, not one per
  # leaf: a train state holds about a thousand leaves, and per-leaf
  # reductions took 6.5 s to compile against 1.0 s (tiny LDM, XLA:CPU).
  by_dtype = {}
  for x in jax.tree.leaves(tree):
    if jnp.issubdtype(x.dtype, jnp.inexact):
      by_dtype.setdefault(x.dtype, []).append(jnp.ravel(x))
  return jnp.all(jnp.array([jnp.isfinite(jnp.concatenate(group)).all()
                            for group in by_dtype.values()], dtype=bool))


def _make_health_check(stage, graphdef: nnx.GraphDef, mesh):
  """(state, batch) -> whether the state's own training loss on `batch` and
  all its arrays are finite. The train step reports the loss of the state it
  starts from, so a diverging update is only seen one step later: this check
  looks at the state that is about to be saved."""

  def healthy(state: train_state.TrainState, batch: dict) -> jax.Array:
    model = nnx.merge(graphdef, state.params, state.rest, copy=True)
    model.train()
    loss, _ = stage.loss(model, state.frozen, train_state.with_step(batch, state.step),
                         jax.random.fold_in(state.rng, state.step))
    return jnp.isfinite(loss) & _all_finite(state)

  # Replicated, so that every process can read the answer.
  return jax.jit(healthy, out_shardings=parallel.replicated(mesh))


def _restore_newest_readable(saved: checkpoint.Checkpointer, config: ml_collections.ConfigDict,
                             abstract: Any, train_iter: Any
                             ) -> tuple[int, train_state.TrainState, list[int]]:
  """(step, state, newer steps that could not be read) of the newest step
  that restores; each failure is reported in a line as it is met."""
  unreadable = []
  for step in sorted(saved.all_steps(), reverse=True):
    try:
      saved_config = saved.restore_config(step)
      config_lib.check_resumable(saved_config, config,
                                 f"checkpoint step {step} in {saved.directory}")
      state = saved.restore(step, abstract, train_iter)
      if not bool(_all_finite(state)):
        raise checkpoint.CheckpointReadError(step, saved.step_directory(step),
                                             "it holds NaN or Inf values")
    except checkpoint.CheckpointReadError as e:
      _warn(str(e))
      unreadable.append(step)
      continue
    if unreadable:
      _warn(f"resuming from step {step}, the newest readable checkpoint; step(s) "
            f"{', '.join(map(str, unreadable))} move to "
            f"{os.path.join(os.path.dirname(saved.directory), UNREADABLE_DIR)}/")
    return step, state, unreadable
  raise NoReadableCheckpointError(
      f"no checkpoint in {saved.directory} can be read (step(s) "
      f"{', '.join(map(str, unreadable))}; causes above). If another version of ldm-jax "
      f"wrote them, resume with that version; otherwise delete {saved.directory} to start "
      "this run over from step 0, or train in a new --workdir.")


def _set_aside(workdir: str, steps: list[int]) -> None:
  """Moves unreadable steps out of the checkpoint directory: orbax would count
  the newest of them as the latest step and refuse to save it again."""
  if steps and jax.process_index() == 0:
    target = os.path.join(workdir, UNREADABLE_DIR)
    os.makedirs(target, exist_ok=True)
    for step in steps:
      destination = os.path.join(target, str(step))
      suffix = 0
      while os.path.exists(destination):  # The same step may fail twice.
        suffix += 1
        destination = os.path.join(target, f"{step}.{suffix}")
      os.replace(os.path.join(runs.checkpoint_dir(workdir), str(step)), destination)
  if steps and jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("ldm_jax.train_loop.set_aside")


def _diverged(what: str, last_saved: int | None, directory: Any) -> NonFiniteLossError:
  if last_saved is None:
    after = (f"No checkpoint has been saved in {directory}, so there is nothing to resume: "
             "lower --config.optim.learning_rate (or fix the cause) and rerun to start over.")
  else:
    after = (f"The last good checkpoint is step {last_saved} in {directory}: lower "
             "--config.optim.learning_rate (a run may resume with a new one) and rerun the "
             "same command to continue from it.")
  return NonFiniteLossError(f"{what}; stopping without saving it. {after}")


def _write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "config.json")
  with files.atomic_write(path) as f:
    json.dump(config_lib.to_json(config), f, indent=2, sort_keys=True)


def _evaluate(config, mesh, eval_step, state) -> dict[str, float]:
  sums: dict[str, Any] = {}
  batches = data.eval_batches(config.data, config.eval.batch_size,
                              num_examples=config.eval.num_examples)
  for batch_number, batch in enumerate(batches):
    out = eval_step(state, parallel.shard_batch(mesh, batch), np.int32(batch_number))
    sums = out if not sums else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  count = max(float(sums.pop("count")), 1.0)
  return {name: float(value) / count for name, value in sums.items()}


def _first_eval_batch(config, mesh) -> dict:
  batch_size = -(-config.eval.picture_examples // mesh.devices.size) * mesh.devices.size
  return parallel.shard_batch(mesh, next(iter(data.eval_batches(
      config.data, batch_size, num_examples=batch_size))))


def _fid(config, stage, graphdef, state, mesh) -> dict[str, float]:
  from ldm_jax import fid  # Loads Inception only for runs that ask for FID.
  num = config.fid.num_samples
  batches = (parallel.shard_batch(mesh, b) for b in data.eval_batches(
      config.data, config.eval.batch_size, num_examples=num))
  generated = stage.fid_images(graphdef, state, batches, num)
  value = fid.fid_against_reference(generated, config.data, weights=config.fid.weights)
  return {f"fid_{len(generated)}": value}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_state.TrainState:
  """Trains `config.stage` in `workdir`, resuming from its latest checkpoint."""
  check_workdir_path(workdir)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.train.batch_size, mesh)  # Before any work is done.
  runs.attach_vae_config(config)

  saved = _open_saved(workdir)
  try:
    _check_workdir_config(workdir, config, saved)
    data.ensure_prepared(config.data)
    stage = runs.make_stage(config)
    train_iter = data.train_iterator(config.data, config.train.batch_size, config.seed)
    replicated = parallel.replicated(mesh)
    unreadable = []
    if saved is None or not saved.all_steps():
      scale_iter = data.train_iterator(config.data, config.train.batch_size, config.seed + 1)
      frozen = stage.init_frozen(parallel.shard_batch(mesh, b) for b in scale_iter)
      graphdef, state = runs.init_train_state(stage, config, frozen, replicated)
      start_step, last_saved = 0, None
    else:
      graphdef, abstract = runs.abstract_train_state(stage, config, replicated)
      start_step, state, unreadable = _restore_newest_readable(saved, config, abstract,
                                                               train_iter)
      last_saved = start_step
      tqdm.write(f"resumed from step {start_step} of {saved.directory}")
  finally:
    if saved is not None:
      saved.close()

  stage.prepare_training(state.frozen, mesh)
  train_step, eval_step = runs.compile_steps(stage, config, mesh, graphdef, state)
  health_check = _make_health_check(stage, graphdef, mesh)

  # The config is valid and the state is in memory: only now may the workdir change.
  os.makedirs(workdir, exist_ok=True)
  _set_aside(workdir, unreadable)
  _write_config(workdir, config)
  keep_steps = set(config.train.keep_steps)
  checkpointer = checkpoint.Checkpointer(runs.checkpoint_dir(workdir),
                                         keep=config.train.keep_checkpoints,
                                         keep_steps=sorted(keep_steps))
  # Records past the restored step were logged by a run that died before
  # saving them; this run logs those steps again.
  writer = MetricWriter(workdir, resume_step=start_step)
  num_steps = config.train.num_steps
  all_finite = jnp.array(True)
  sums, sum_steps, interval_start = None, 0, time.perf_counter()
  batch, checked_step = None, None

  def stop_if_diverged(step):
    """Raises unless every loss so far and the current state are finite."""
    nonlocal checked_step
    if not bool(all_finite):
      raise _diverged(f"the training loss became NaN or Inf at or before step {step}",
                      last_saved, checkpointer.directory)
    if checked_step != step:
      if not bool(health_check(state, batch)):
        raise _diverged(f"the model after step {step} has a NaN or Inf loss or parameters",
                        last_saved, checkpointer.directory)
      checked_step = step

  def save(step, metrics=None):
    nonlocal last_saved
    stop_if_diverged(step)
    writer.flush()  # The records of `step` are on disk before its checkpoint.
    checkpointer.save(step, state, config_lib.to_json(config), train_iter, metrics=metrics)
    last_saved = step

  progress = tqdm(total=num_steps, initial=start_step, desc=f"train {config.stage}",
                  unit="step", dynamic_ncols=True,
                  disable=not config.train.progress_bar or jax.process_index() != 0)
  try:
    with _Preemption() as preemption:
      for step in range(start_step + 1, num_steps + 1):
        batch = parallel.shard_batch(mesh, stage.train_batch(next(train_iter)))
        state, metrics = train_step(state, batch)
        all_finite = all_finite & jnp.isfinite(metrics["loss"])
        sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
        sum_steps += 1
        progress.update(1)

        if step % config.train.log_every == 0 or step == num_steps:
          if not bool(all_finite):
            stop_if_diverged(step)  # Raises with the message naming the intact checkpoint.
          elapsed = time.perf_counter() - interval_start
          logged = {k: float(v) / sum_steps for k, v in jax.device_get(sums).items()}
          logged["steps_per_second"] = sum_steps / elapsed
          logged["images_per_second"] = sum_steps * config.train.batch_size / elapsed
          writer.write(step, logged, prefix="train/")
          progress.set_postfix(loss=f"{logged['loss']:.4g}",
                               img_s=f"{logged['images_per_second']:.0f}")
          sums, sum_steps, interval_start = None, 0, time.perf_counter()

        eval_metrics = None
        if step % config.train.eval_every == 0 or step == num_steps:
          stop_if_diverged(step)  # No eval, picture or FID of a diverged model.
          eval_metrics = _evaluate(config, mesh, eval_step, state)
          if config.fid.every and (step % config.fid.every == 0 or step == num_steps):
            eval_metrics.update(_fid(config, stage, graphdef, state, mesh))
          writer.write(step, eval_metrics, prefix="eval/")
          picture = stage.picture(graphdef, state, _first_eval_batch(config, mesh))
          if jax.process_index() == 0:
            images.save_png(os.path.join(workdir, stage.picture_name), picture)
            images.save_png(os.path.join(workdir, "pictures", f"step_{step:07d}.png"), picture)
          writer.write_image(step, stage.picture_name.removesuffix(".png"), picture)

        if (step % config.train.checkpoint_every == 0 or step == num_steps or eval_metrics
            or step in keep_steps):
          best = {checkpoint.BEST_METRIC: eval_metrics["loss"]} if eval_metrics else None
          save(step, best)
        if eval_metrics is not None or step % config.train.checkpoint_every == 0:
          interval_start = time.perf_counter()  # Eval and saving are not training speed.
        preempted = preemption.requested if jax.process_count() == 1 else (
            checkpointer.reached_preemption(step))
        if preempted:
          if last_saved != step:
            save(step)
          logging.warning("SIGTERM: saved step %d, exiting; rerun the same command to resume",
                          step)
          break
  finally:
    progress.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
  return state
