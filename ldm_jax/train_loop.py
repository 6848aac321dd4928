"""The one training loop, shared by every stage.

  state  <- restore latest checkpoint of workdir, or initialise
  repeat: batch -> jit train step (donated state) -> metrics
          every log_every:        progress bar, stdout, metrics.jsonl, TensorBoard
          every eval_every:       eval metrics on the test split + picture (+ FID)
          every checkpoint_every: orbax checkpoint with the data iterator
  SIGTERM (preemption) -> checkpoint, then exit; a NaN/Inf loss -> stop, last
  good checkpoint kept.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from tqdm import tqdm

from ldm_jax import checkpoint, config as config_lib, data, images, parallel, runs, train_state
from ldm_jax.metric_writer import MetricWriter


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the message says which checkpoint is intact."""


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


def _check_workdir_config(workdir: str, config: ml_collections.ConfigDict,
                          checkpointer: checkpoint.Checkpointer) -> None:
  saved_path = os.path.join(workdir, "config.json")
  if checkpointer.latest_step() is not None:
    config_lib.check_resumable(checkpointer.restore_config(), config,
                               f"the checkpoint in {checkpointer.directory}")
  elif os.path.exists(saved_path):
    with open(saved_path) as f:
      config_lib.check_resumable(json.load(f), config, saved_path)


def _write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, "config.json")
  with open(path + ".partial", "w") as f:
    json.dump(config_lib.to_json(config), f, indent=2, sort_keys=True)
  os.replace(path + ".partial", path)


def _evaluate(config, mesh, eval_step, state) -> dict[str, float]:
  sums: dict[str, Any] = {}
  batches = data.eval_batches(config.data, config.eval.batch_size,
                              num_examples=config.eval.num_examples)
  for batch in batches:
    out = eval_step(state, parallel.shard_batch(mesh, batch))
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
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.train.batch_size, mesh)  # Before any work is done.
  runs.attach_vae_config(config)

  checkpointer = checkpoint.Checkpointer(runs.checkpoint_dir(workdir),
                                         keep=config.train.keep_checkpoints)
  _check_workdir_config(workdir, config, checkpointer)
  _write_config(workdir, config)
  data.ensure_prepared(config.data)

  stage = runs.make_stage(config)
  train_iter = data.train_iterator(config.data, config.train.batch_size, config.seed)
  replicated = parallel.replicated(mesh)
  start_step = checkpointer.latest_step()
  if start_step is None:
    scale_iter = data.train_iterator(config.data, config.train.batch_size, config.seed + 1)
    frozen = stage.init_frozen(parallel.shard_batch(mesh, b) for b in scale_iter)
    graphdef, state = runs.init_train_state(stage, config, frozen, replicated)
    start_step = 0
  else:
    graphdef, abstract = runs.abstract_train_state(stage, config, replicated)
    state = checkpointer.restore(start_step, abstract, train_iter)
    tqdm.write(f"resumed from step {start_step} of {checkpointer.directory}")

  train_step, eval_step = runs.compile_steps(stage, config, mesh, graphdef, state)

  writer = MetricWriter(workdir)
  num_steps = config.train.num_steps
  last_saved = start_step
  all_finite = jnp.array(True)
  sums, sum_steps, interval_start = None, 0, time.perf_counter()

  def save(step, metrics=None):
    nonlocal last_saved
    if not bool(all_finite):
      raise NonFiniteLossError(
          f"the loss became NaN or Inf at or before step {step}; stopping without saving. "
          f"The last good checkpoint is step {last_saved} in {checkpointer.directory}")
    checkpointer.save(step, state, config_lib.to_json(config), train_iter, metrics=metrics)
    last_saved = step

  progress = tqdm(total=num_steps, initial=start_step, desc=f"train {config.stage}",
                  unit="step", dynamic_ncols=True,
                  disable=not config.train.progress_bar or jax.process_index() != 0)
  try:
    with _Preemption() as preemption:
      for step in range(start_step + 1, num_steps + 1):
        batch = parallel.shard_batch(mesh, next(train_iter))
        state, metrics = train_step(state, batch)
        all_finite = all_finite & jnp.isfinite(metrics["loss"])
        sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
        sum_steps += 1
        progress.update(1)

        if step % config.train.log_every == 0 or step == num_steps:
          if not bool(all_finite):
            save(step)  # Raises with the message naming the intact checkpoint.
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
          eval_metrics = _evaluate(config, mesh, eval_step, state)
          if config.fid.every and (step % config.fid.every == 0 or step == num_steps):
            eval_metrics.update(_fid(config, stage, graphdef, state, mesh))
          writer.write(step, eval_metrics, prefix="eval/")
          picture = stage.picture(graphdef, state, _first_eval_batch(config, mesh))
          if jax.process_index() == 0:
            images.save_png(os.path.join(workdir, stage.picture_name), picture)
            images.save_png(os.path.join(workdir, "pictures", f"step_{step:07d}.png"), picture)
          writer.write_image(step, stage.picture_name.removesuffix(".png"), picture)

        if step % config.train.checkpoint_every == 0 or step == num_steps or eval_metrics:
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
