"""Crashes, divergence and damaged checkpoints: what a run does when things go wrong.

  * SIGKILLed at random moments and resumed each time, a run ends with the
    very state of an uninterrupted one, and its metrics (metrics.jsonl and
    TensorBoard) hold each logged step once, in order, with the same values.
  * A loss that becomes NaN/Inf never leaves a diverged state as a
    checkpoint, the message names a checkpoint that exists (or says there is
    none), and the run resumes from it with a lower learning rate.
  * A damaged latest checkpoint is reported in a line and the newest readable
    one is used; if none can be read, the run stops having changed nothing.

The runs are the tiny VAE of conftest.vae_config (10 steps, checkpoints at 5
and 10), compared with the session's uninterrupted `vae_workdir`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from conftest import vae_config
from ldm_jax import checkpoint, cli, runs, train_loop
from ldm_jax.metric_writer import read_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Keys that describe speed or wall time, which no two runs share.
_TIMING_KEYS = ("time", "train/steps_per_second", "train/images_per_second")


def _trained_arrays(state):
  return jax.tree.leaves(jax.device_get((state.params, state.opt_state, state.ema_params,
                                         state.step)))


def _load_state(workdir, step):
  return runs.load_run(workdir, step)[2]


def _comparable(records):
  return [{k: v for k, v in r.items() if k not in _TIMING_KEYS} for r in records]


def _metrics(workdir):
  return read_records(os.path.join(workdir, "metrics.jsonl"))


def _tensorboard_scalars(workdir):
  """{tag: [(step, value), ...]} as TensorBoard shows them: files read in
  name order, and a session-start event at step s discards the earlier
  events of steps >= s (what TensorBoard does for a restarted run)."""
  from tensorboardX.proto import event_pb2
  scalars: dict[str, list[tuple[int, float]]] = {}
  logdir = os.path.join(workdir, "tensorboard")
  for name in sorted(os.listdir(logdir)):
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    offset = 0
    while offset + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      payload = data[offset + 12:offset + 12 + length]
      offset += 12 + length + 4
      if len(payload) < length:
        break  # A record cut short by a kill.
      event = event_pb2.Event.FromString(payload)
      if event.HasField("session_log") and (
          event.session_log.status == event_pb2.SessionLog.START):
        scalars = {tag: [(s, v) for s, v in points if s < event.step]
                   for tag, points in scalars.items()}
      for value in event.summary.value:
        if value.HasField("simple_value"):
          scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def _run_until(command, env, trigger, delay, timeout=300):
  """Runs `command`; `delay` seconds after a stdout line matches `trigger`,
  SIGKILLs it. Returns (exit status, output)."""
  process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  watchdog = threading.Timer(timeout, process.kill)
  watchdog.start()
  killer = None
  lines = []
  try:
    for line in process.stdout:
      lines.append(line)
      if trigger and killer is None and re.search(trigger, line):
        killer = threading.Timer(delay, process.kill)
        killer.start()
    process.wait()
  finally:
    watchdog.cancel()
    if killer is not None:
      killer.cancel()
  return process.returncode, "".join(lines)


def test_sigkill_at_random_moments_then_resume_is_exact(vae_workdir, tiny_data_dir, tmp_path):
  seed = int(os.environ.get("LDM_JAX_CRASH_SEED", random.randrange(1 << 30)))
  rng = random.Random(seed)
  workdir = str(tmp_path / "killed")
  reference = vae_config(tiny_data_dir)
  command = [sys.executable, "train.py", "--config=configs/tiny_vae.py", f"--workdir={workdir}",
             f"--config.data.data_dir={tiny_data_dir}"] + [
                 f"--config.train.{key}={reference.train[key]}"
                 for key in ("num_steps", "log_every", "eval_every", "checkpoint_every")]
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  # Each kill waits for a point of the run (a logged step, so around a
  # checkpoint being written, or the final eval), then a random delay.
  kills = [(r"^step 5: train", rng.uniform(0.0, 0.8)),
           (r"^step \d+: train", rng.uniform(0.0, 2.0)),
           (r"^step 10: ", rng.uniform(0.0, 1.5))]
  statuses = []
  for trigger, delay in kills + [(None, 0.0)]:
    status, output = _run_until(command, env, trigger, delay)
    statuses.append(status)
    assert status in (0, -signal.SIGKILL), f"seed {seed}: exit {status}\n{output}"
  assert statuses[-1] == 0 and -signal.SIGKILL in statuses, f"seed {seed}: {statuses}"

  with checkpoint.Checkpointer(runs.checkpoint_dir(workdir), read_only=True) as saved:
    assert saved.all_steps() == [5, 10], f"seed {seed}"
  ours, theirs = _load_state(workdir, 10), _load_state(vae_workdir, 10)
  for a, b in zip(_trained_arrays(ours), _trained_arrays(theirs), strict=True):
    np.testing.assert_array_equal(a, b, err_msg=f"seed {seed}")

  records, expected = _metrics(workdir), _metrics(vae_workdir)
  assert [(r["step"], "eval/loss" in r) for r in records] == [(5, False), (10, False), (10, True)]
  assert _comparable(records) == _comparable(expected), f"seed {seed}"
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert len(f.readlines()) == len(records)  # No torn or duplicate lines left.

  # TensorBoard shows the same points (stored as float32), each step once.
  scalars = _tensorboard_scalars(workdir)
  for record in records:
    for tag, value in record.items():
      if tag != "step" and tag not in _TIMING_KEYS:
        assert [s for s, _ in scalars[tag]].count(record["step"]) == 1, (tag, record, seed)
        point = dict(scalars[tag])[record["step"]]
        assert point == pytest.approx(value, rel=1e-6), (tag, seed)
  for tag, points in scalars.items():
    steps = [s for s, _ in points]
    assert steps == sorted(set(steps)), (tag, steps, seed)


def _max_abs(state):
  return max(float(np.max(np.abs(x))) for x in jax.tree.leaves(jax.device_get(state.params)))


def test_nan_stop_keeps_no_diverged_state_and_a_lower_lr_resumes(tiny_data_dir, tmp_path,
                                                                 capsys):
  """Learning rate 1e10: the first update (warmup starts at 0) is harmless,
  the second throws the parameters to ~1e9, whose loss is NaN. (All runs are
  10 steps long so that they share compiled programs.)"""
  def diverging(**train):
    config = vae_config(tiny_data_dir, log_every=1, eval_every=100, **train)
    config.optim.learning_rate = 1e10
    return config

  # No checkpoint yet when it diverges: the message must not invent one.
  fresh = str(tmp_path / "fresh")
  with pytest.raises(train_loop.NonFiniteLossError, match="No checkpoint has been saved") as e:
    train_loop.train_and_evaluate(diverging(checkpoint_every=100), fresh)
  assert "step 0" not in str(e.value)
  assert not os.listdir(runs.checkpoint_dir(fresh))

  workdir = str(tmp_path / "diverged")
  with pytest.raises(train_loop.NonFiniteLossError) as e:
    train_loop.train_and_evaluate(diverging(checkpoint_every=1), workdir)
  named = int(re.search(r"last good checkpoint is step (\d+)", str(e.value)).group(1))
  with checkpoint.Checkpointer(runs.checkpoint_dir(workdir), read_only=True) as saved:
    steps = saved.all_steps()
  assert steps and named == steps[-1]
  for step in steps:  # Every saved state is finite and not diverged.
    assert _max_abs(_load_state(workdir, step)) < 100.0, step
  logged = [r["step"] for r in _metrics(workdir)]
  assert logged[-1] > named  # The diverging steps were logged ...

  # The recipe's own learning rate (3e-3) is the lower one.
  capsys.readouterr()
  state = train_loop.train_and_evaluate(
      vae_config(tiny_data_dir, log_every=1, checkpoint_every=100), workdir)
  assert f"resumed from step {named}" in capsys.readouterr().out
  assert int(state.step) == 10 and _max_abs(state) < 100.0
  # ... and are replaced by the resumed run's: each step once, in order.
  records = _metrics(workdir)
  assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 11))
  assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _largest_file(directory):
  files = [os.path.join(d, name) for d, _, names in os.walk(directory) for name in names]
  return max(files, key=os.path.getsize)


def _snapshot(root):
  """Every file under `root` with its bytes: what "nothing changed" compares."""
  found = {}
  for directory, _, names in os.walk(root):
    for name in names:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, root)] = f.read()
  return found


def test_damaged_latest_checkpoint_falls_back_to_the_newest_readable(
    vae_workdir, tiny_data_dir, tmp_path, capsys):
  workdir = str(tmp_path / "damaged")
  shutil.copytree(vae_workdir, workdir)
  damaged = _largest_file(os.path.join(runs.checkpoint_dir(workdir), "10", "state", "d"))
  _truncate(damaged)

  state = train_loop.train_and_evaluate(vae_config(tiny_data_dir), workdir)
  report = capsys.readouterr().err
  line = [l for l in report.splitlines() if "cannot be read" in l]
  assert len(line) == 1, report
  assert "checkpoint step 10 in " in line[0] and os.path.join("checkpoints", "10") in line[0]
  assert os.path.relpath(damaged, os.path.join(runs.checkpoint_dir(workdir), "10")) in line[0]
  assert "resuming from step 5" in report
  assert os.path.isdir(os.path.join(workdir, train_loop.UNREADABLE_DIR, "10"))
  # Resumed from step 5 exactly: the same state as the uninterrupted run.
  for a, b in zip(_trained_arrays(state), _trained_arrays(_load_state(vae_workdir, 10))):
    np.testing.assert_array_equal(a, b)
  with checkpoint.Checkpointer(runs.checkpoint_dir(workdir), read_only=True) as saved:
    assert saved.all_steps() == [5, 10]
  assert [r["step"] for r in _metrics(workdir)] == [5, 10, 10]


def test_no_readable_checkpoint_stops_and_changes_nothing(vae_workdir, tiny_data_dir,
                                                          tmp_path, capsys):
  workdir = str(tmp_path / "ruined")
  shutil.copytree(vae_workdir, workdir)
  _truncate(_largest_file(os.path.join(runs.checkpoint_dir(workdir), "10", "state", "d")))
  with open(os.path.join(runs.checkpoint_dir(workdir), "5", "state", "manifest.ocdbt"),
            "r+b") as f:
    f.seek(20)
    f.write(os.urandom(64))
  before = _snapshot(workdir)
  # A longer run: config.json would say so if it were written before the restore.
  with pytest.raises(train_loop.NoReadableCheckpointError) as e:
    train_loop.train_and_evaluate(vae_config(tiny_data_dir, num_steps=12), workdir)
  assert f"delete {runs.checkpoint_dir(workdir)}" in str(e.value)
  assert "\n" not in cli.describe(e.value)
  report = capsys.readouterr().err
  assert "checkpoint step 10 in" in report and "checkpoint step 5 in" in report
  assert _snapshot(workdir) == before


def test_workdir_that_is_a_file_is_refused(tiny_data_dir, tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("not a workdir")
  with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
    train_loop.train_and_evaluate(vae_config(tiny_data_dir), str(path))
  assert path.read_text() == "not a workdir"


@pytest.mark.parametrize("error, expected", [
    # ml_collections wraps a KeyError, whose str() would repr-escape the message.
    (AttributeError(KeyError("'batch_sz'\nDid you mean \"batch_size\" instead of \"batch_sz\"?")),
     "unknown config key 'batch_sz' in --config.train.batch_sz; Did you mean \"batch_size\""),
    (OSError("Configuration is not available because of an earlier failure to load: Failed "
             "loading config file config_config\n  Attempted [Relative path]:\n    "
             "configs/nope.py\n      [Errno 2] No such file or directory: 'configs/nope.py'"),
     "could not load --config=configs/nope.py: [Errno 2] No such file or directory"),
    (FileNotFoundError("runs/x holds no checkpoints"), "runs/x holds no checkpoints"),
    (TypeError("unsupported operand"), "TypeError: unsupported operand"),
])
def test_cli_messages_are_readable(error, expected):
  message = cli.describe(error, ["train.py", "--config.train.batch_sz=16"])
  assert message.startswith(expected)
  assert "\\n" not in message and "\\'" not in message


def test_metrics_log_drops_records_past_the_resumed_step(tmp_path):
  from ldm_jax import metric_writer
  path = tmp_path / "metrics.jsonl"
  lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in (1, 2, 3)]
  path.write_text("".join(lines) + '{"step": 4, "train/lo')  # Torn by a kill.
  writer = metric_writer.MetricWriter(str(tmp_path), enabled=True, resume_step=2)
  writer.write(3, {"loss": 0.5}, prefix="train/")
  writer.close()
  assert [(r["step"], r["train/loss"]) for r in read_records(str(path))] == [
      (1, 1.0), (2, 0.5), (3, 0.5)]
  assert path.read_text().startswith("".join(lines[:2]))
