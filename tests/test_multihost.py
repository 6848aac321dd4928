"""Multi-process runs, proven on this machine with several JAX processes.

The launcher (`python -m ldm_jax.launch`) starts real processes with gloo
collectives between them. Those runs are the expensive part (each process
imports JAX and compiles), so a few scenarios carry most of the checks:

  * the tiny VAE through train.py on 2 processes x 1 device: started by one
    process, continued by two (SIGKILL of one, then a rerun, then SIGTERM of
    one), finished by one again; every step's loss and the final parameters
    equal an uninterrupted single-process run on 2 devices;
  * FID features on 2 processes x 1 device, the job described by SLURM
    variables (JAX's SLURM discovery), against one process on 2 devices;
  * (opt-in, LDM_JAX_MULTIHOST_LDM=1: several CPU-minutes) the tiny LDM and
    its samples on 2 processes x 4 devices against the shared 8-device run
    of conftest.

The data sharding itself is checked in this process, with process_index and
process_count given explicitly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from etils import epath
from PIL import Image

import multihost_worker
from conftest import PreemptedAfter, ldm_config, vae_config
from ldm_jax import checkpoint, config as config_lib, data, launch, parallel, runs, train_loop
from ldm_jax.data import augment, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------ start-up


def test_distributed_arguments_come_from_the_environment(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
               parallel.HEARTBEAT_TIMEOUT_ENV):
    monkeypatch.delenv(name, raising=False)
  # Nothing set: everything is left to JAX's cluster discovery.
  assert parallel.distributed_arguments() == dict(
      coordinator_address=None, num_processes=None, process_id=None)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  monkeypatch.setenv(parallel.HEARTBEAT_TIMEOUT_ENV, "20")
  assert parallel.distributed_arguments() == dict(
      coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
      heartbeat_timeout_seconds=20)
  monkeypatch.setenv("JAX_PROCESS_ID", "three")
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='three' is not an integer"):
    parallel.distributed_arguments()


def test_an_incomplete_job_description_is_a_clear_error():
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS", "SLURM_"))}
  env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{launch.free_port()}", PYTHONPATH=ROOT)
  result = subprocess.run(
      [sys.executable, "-c", "from ldm_jax import parallel; parallel.initialize_distributed(True)"],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "JAX_NUM_PROCESSES" in result.stderr and "JAX_PROCESS_ID" in result.stderr
  assert "Number of processes must be defined" in result.stderr  # JAX's own words, kept.


# ------------------------------------------------------------ the launcher


def test_process_environments_describe_the_job():
  base = {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8",
          "SLURM_JOB_ID": "7", "JAX_PROCESS_ID": "5", "KEEP": "me"}
  jax_style = launch.process_environments(2, 3, base=base, port=4567)
  for index, env in enumerate(jax_style):
    assert env["JAX_PROCESS_ID"] == str(index)
    assert env["JAX_NUM_PROCESSES"] == "2"
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:4567"
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=3"
    assert env["JAX_NUM_CPU_DEVICES"] == "3" and env["JAX_PLATFORMS"] == "cpu"
    assert env["LDM_JAX_DISTRIBUTED"] == "1" and env["KEEP"] == "me"
    assert "SLURM_JOB_ID" not in env
  slurm_style = launch.process_environments(2, 1, style="slurm", base=base)
  job_id = int(slurm_style[0]["SLURM_JOB_ID"])
  for index, env in enumerate(slurm_style):
    assert "JAX_PROCESS_ID" not in env and "JAX_COORDINATOR_ADDRESS" not in env
    assert (env["SLURM_PROCID"], env["SLURM_NTASKS"]) == (str(index), "2")
    assert env["SLURM_JOB_ID"] == str(job_id)
    # The port JAX derives from the job id, bound on loopback only.
    assert env["JAX_COORDINATOR_BIND_ADDRESS"] == f"127.0.0.1:{job_id % 4096 + 61440}"


class Launch:
  """`python -m ldm_jax.launch ARGS -- COMMAND` running in the background,
  its output collected line by line."""

  def __init__(self, args, command):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])
    self.process = subprocess.Popen(
        [sys.executable, "-m", "ldm_jax.launch", *args, "--", *command], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    self.lines: list[str] = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in self.process.stdout:
      self.lines.append(line.rstrip("\n"))

  @property
  def output(self) -> str:
    return "\n".join(self.lines)

  def wait_for(self, pattern: str, timeout: float = 240) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      for line in list(self.lines):
        if match := re.search(pattern, line):
          return match
      if self.process.poll() is not None and not self._reader.is_alive():
        break
      time.sleep(0.05)
    self.kill()
    raise AssertionError(f"no line matching {pattern!r}; output:\n{self.output[-5000:]}")

  def pid(self, index: int) -> int:
    return int(self.wait_for(rf"\[launch\] started .*\b{index}=pid (\d+)").group(1))

  def wait(self, timeout: float = 300) -> int:
    try:
      code = self.process.wait(timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      raise AssertionError(f"the launcher still runs after {timeout} s:\n{self.output[-5000:]}")
    self._reader.join(10)
    return code

  def kill(self):
    """The launcher and the processes it started (each in its own group)."""
    started = [l for l in self.lines if l.startswith("[launch] started")]
    pids = [int(p) for p in re.findall(r"=pid (\d+)", started[0])] if started else []
    for group in [self.process.pid] + pids:
      try:
        os.killpg(group, signal.SIGKILL)
      except ProcessLookupError:
        pass


def _python(code: str) -> list[str]:
  return [sys.executable, "-c", code]


def test_launcher_runs_every_process_with_its_identity():
  run = Launch(["--num_processes=3", "--devices_per_process=2"], _python(
      "import os; print(os.environ['JAX_PROCESS_ID'], os.environ['JAX_NUM_PROCESSES'],"
      " os.environ['JAX_NUM_CPU_DEVICES'])"))
  assert run.wait(60) == 0
  for index in range(3):
    assert f"[{index}] {index} 3 2" in run.lines
  assert "[launch] all 3 processes finished" in run.lines


def test_a_failed_process_stops_the_others_within_the_timeout():
  # Process 0 ignores SIGTERM, as one stuck in a collective would.
  run = Launch(["--num_processes=2", "--kill_timeout=1"], _python(
      "import os, signal, sys, time\n"
      "if os.environ['JAX_PROCESS_ID'] == '1': sys.exit(3)\n"
      "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('waiting', flush=True)\n"
      "time.sleep(600)"))
  start = time.monotonic()
  assert run.wait(60) == 3
  assert time.monotonic() - start < 30
  assert any("ERROR: process 1 failed (exit code 3)" in line for line in run.lines)
  assert any("killing them" in line for line in run.lines)
  assert any("FAILED: process 1 exit code 3; exit statuses 0: killed by SIGKILL" in line
             for line in run.lines), run.output


def test_sigterm_to_the_launcher_reaches_every_process():
  run = Launch(["--num_processes=2"], _python(
      "import os, signal, sys, time\n"
      "def stop(*_): print('stopping', os.environ['JAX_PROCESS_ID'], flush=True); sys.exit(0)\n"
      "signal.signal(signal.SIGTERM, stop); print('ready', flush=True)\n"
      "time.sleep(600)"))
  run.wait_for(r"\[0\] ready")
  run.wait_for(r"\[1\] ready")
  run.process.send_signal(signal.SIGTERM)
  assert run.wait(60) == 0
  assert "[0] stopping 0" in run.lines and "[1] stopping 1" in run.lines


# ------------------------------------------------------------ data sharding


def _local_batches(config, global_batch, count, index, num_batches, seed=0):
  it = data.train_iterator(config, global_batch, seed, process_index=index,
                           process_count=count)
  return it, [next(it) for _ in range(num_batches)]


def _assembled(config, global_batch, count, num_batches):
  """Global batches stitched from every process's slices, as shard_batch does."""
  per_process = [_local_batches(config, global_batch, count, i, num_batches)[1]
                 for i in range(count)]
  return [{k: np.concatenate([p[b][k] for p in per_process]) for k in ("image", "label")}
          for b in range(num_batches)]


def test_global_batches_are_the_same_on_any_process_count(tiny_data_dir):
  config = vae_config(tiny_data_dir).data  # Flip and crop on.
  # 400 examples in batches of 80: 6 batches cross into the second epoch.
  single = _assembled(config, 80, 1, 6)
  for count in (2, 4):
    for ours, theirs in zip(_assembled(config, 80, count, 6), single):
      np.testing.assert_array_equal(ours["image"], theirs["image"])
      np.testing.assert_array_equal(ours["label"], theirs["label"])


def test_processes_split_every_global_batch_and_cover_each_epoch_once(tiny_data_dir):
  config = vae_config(tiny_data_dir).data
  config.random_flip, config.crop_padding = False, 0
  reference, _ = data.load_split_images(config, "train")
  row_of = {image.tobytes(): row for row, image in enumerate(reference)}
  assert len(row_of) == len(reference)  # Images identify their rows.

  def rows(batch):
    uint8 = np.round((batch["image"] + 1) * 127.5).astype(np.uint8)
    return [row_of[image.tobytes()] for image in uint8]

  num_batches = 2 * 400 // 80  # Two epochs.
  per_process = [[rows(b) for b in _local_batches(config, 80, 2, i, num_batches)[1]]
                 for i in range(2)]
  for first, second in zip(*per_process):
    assert len(first) == len(second) == 40 and not set(first) & set(second)
  for epoch in range(2):
    seen = [row for process in per_process for batch in process[epoch * 5:(epoch + 1) * 5]
            for row in batch]
    assert sorted(seen) == list(range(400))  # Every example once, none twice.


def test_iterator_state_moves_across_process_counts(tiny_data_dir):
  config = vae_config(tiny_data_dir).data
  two_processes, _ = _local_batches(config, 32, 2, 1, 3)
  state = two_processes.get_state()
  single, batches = _local_batches(config, 32, 1, 0, 4)
  on_one = data.train_iterator(config, 32, 0, process_index=0, process_count=1)
  on_one.set_state(state)
  np.testing.assert_array_equal(next(on_one)["image"], batches[3]["image"])
  on_four = data.train_iterator(config, 32, 0, process_index=2, process_count=4)
  on_four.set_state(single.get_state())
  fifth = next(single)
  np.testing.assert_array_equal(next(on_four)["image"], fifth["image"][16:24])


def test_sliced_augmentation_is_augment_batch_of_the_global_batch():
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8),
           "label": np.arange(12, dtype=np.int32)}
  whole = augment.augment_batch(batch, np.random.default_rng(1), random_flip=True,
                                crop_padding=4)
  part = pipeline._augment_rows(
      {"image": batch["image"][4:8], "label": batch["label"][4:8], "index": np.arange(4, 8)},
      np.random.default_rng(1),
      rows=slice(4, 8), global_batch_size=12, random_flip=True, crop_padding=4)
  np.testing.assert_array_equal(part["image"], whole["image"][4:8])
  np.testing.assert_array_equal(part["label"], whole["label"][4:8])
  np.testing.assert_array_equal(part["index"], np.arange(4, 8))


def test_data_state_of_another_process_count(tiny_data_dir, tmp_path):
  """The checkpoint item of the data stream, as two processes write it,
  restored in one process: same position, same next batch."""
  config = vae_config(tiny_data_dir).data
  directory = epath.Path(tmp_path)
  after_two, _ = _local_batches(config, 16, 1, 0, 2)
  for index in range(2):
    (directory / f"process_{index}-of-2.json").write_text(
        json.dumps(after_two.get_state(), indent=4))
  handler = checkpoint._DataIteratorHandler()
  resumed = data.train_iterator(config, 16, 0, process_index=0, process_count=1)
  handler.restore(directory, args=checkpoint._DataRestore(resumed))
  np.testing.assert_array_equal(next(resumed)["image"], next(after_two)["image"])
  # Files that disagree cannot be continued on another count: refused.
  after_five, _ = _local_batches(config, 16, 1, 0, 5)
  (directory / "process_1-of-2.json").write_text(json.dumps(after_five.get_state()))
  with pytest.raises(ValueError, match=r"cannot resume the data stream on 1 process"):
    handler.restore(directory, args=checkpoint._DataRestore(resumed))


# ------------------------------------------------------------ real runs


def _on_devices(monkeypatch, count: int) -> None:
  """Runs in this process use the first `count` of its 8 devices."""
  real = parallel.make_mesh
  monkeypatch.setattr(parallel, "make_mesh",
                      lambda num_devices=None: real(num_devices or count))


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _losses(workdir) -> list[tuple[int, float]]:
  return [(m["step"], m["train/loss"]) for m in _metrics(workdir) if "train/loss" in m]


def _named_leaves(tree) -> list[tuple[str, np.ndarray]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
  return [(jax.tree_util.keystr(path), np.asarray(x)) for path, x in flat]


# Conv biases that feed a GroupNorm have a true gradient of zero: Adam turns
# the rounding noise of their gradient, which differs with the program's
# reduction order, into steps of about the learning rate. Over these 16 steps
# (smoke learning rate 3e-3, cosine) that adds up to about 0.03 at most, and
# XLA's own convolution kernels (ldm_jax/__init__.py) reach 0.008. So a bias
# that small is held only to that bound; every other parameter, larger
# biases included, must agree closely, and the losses of every step to 1e-6.
_ADAM_NOISE_BOUND = 3e-2


def _assert_same_params(ours: list[np.ndarray], theirs: list[tuple[str, np.ndarray]]):
  assert len(ours) == len(theirs)
  tight = 0
  for a, (name, b) in zip(ours, theirs):
    small = max(np.abs(a).max(), np.abs(b).max()) < _ADAM_NOISE_BOUND
    if name.endswith("['bias'].value") and small:
      np.testing.assert_allclose(a, b, rtol=0, atol=_ADAM_NOISE_BOUND, err_msg=name)
      continue
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)
    tight += 1
  assert tight > 0.4 * len(theirs)


def _latest_step(workdir):
  with checkpoint.Checkpointer(runs.checkpoint_dir(workdir), read_only=True) as ckpt:
    return ckpt.latest_step()


VAE_STEPS = 16


def test_vae_on_two_processes_matches_one_through_kill_rerun_and_preemption(
    tiny_data_dir, tmp_path, monkeypatch):
  """1 process -> 2 processes (one SIGKILLed) -> 2 again (one SIGTERMed) ->
  1 process == one uninterrupted process, all on 2 devices in total."""
  settings = dict(num_steps=VAE_STEPS, log_every=1, checkpoint_every=2, eval_every=VAE_STEPS)
  _on_devices(monkeypatch, 2)
  reference = str(tmp_path / "reference")
  expected = train_loop.train_and_evaluate(vae_config(tiny_data_dir, **settings), reference)
  expected_losses = dict(_losses(reference))
  assert len(expected_losses) == VAE_STEPS

  workdir = str(tmp_path / "run")
  monkeypatch.setattr(train_loop, "_Preemption", type("After2", (PreemptedAfter,), {"steps": 2}))
  train_loop.train_and_evaluate(vae_config(tiny_data_dir, **settings), workdir)
  monkeypatch.setattr(train_loop, "_Preemption", PreemptedAfter.__mro__[1])
  assert _latest_step(workdir) == 2

  command = [sys.executable, "train.py", "--config=configs/tiny_vae.py", f"--workdir={workdir}",
             f"--config.data.data_dir={tiny_data_dir}",
             *[f"--config.train.{k}={v}" for k, v in settings.items()]]
  two_processes = ["--num_processes=2", "--devices_per_process=1", "--kill_timeout=5"]

  # A process dies: the other is stopped, the launcher fails, saying which.
  killed = Launch(two_processes, command)
  killed.wait_for(r"\[1\] resumed from step 2 ")
  killed.wait_for(r"\[0\] step 5: train/")
  os.kill(killed.pid(1), signal.SIGKILL)
  start = time.monotonic()
  assert killed.wait(120) != 0
  assert time.monotonic() - start < 5 + 15
  assert any("ERROR: process 1 failed (killed by SIGKILL)" in l for l in killed.lines)
  # Async saves still in flight when it died are left incomplete and unseen.
  complete = _latest_step(workdir)
  assert complete >= 2

  # The rerun resumes from the last complete checkpoint; a SIGTERM to one
  # process makes both save the same step and stop cleanly.
  preempted = Launch(two_processes, command)
  for index in range(2):
    preempted.wait_for(rf"\[{index}\] resumed from step {complete} ")
  preempted.wait_for(rf"\[0\] step {complete + 2}: train/")
  os.kill(preempted.pid(1), signal.SIGTERM)
  assert preempted.wait(120) == 0, preempted.output[-3000:]
  saved = {int(preempted.wait_for(rf"\[{i}\] .*SIGTERM: saved step (\d+)").group(1))
           for i in range(2)}
  assert len(saved) == 1
  stopped = saved.pop()
  assert complete + 2 <= stopped < VAE_STEPS and _latest_step(workdir) == stopped
  data_files = os.listdir(os.path.join(workdir, "checkpoints", str(stopped), "data"))
  assert sorted(f for f in data_files if f.endswith(".json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
  # Only process 0 reports metrics.
  for run in (killed, preempted):
    assert not any(l.startswith("[1] step ") for l in run.lines)
    assert any(l.startswith("[0] step ") for l in run.lines)

  # One process again, to the end.
  finished = train_loop.train_and_evaluate(vae_config(tiny_data_dir, **settings), workdir)
  logged = _losses(workdir)
  assert {step for step, _ in logged} == set(range(1, VAE_STEPS + 1))
  for step, loss in logged:
    assert loss == pytest.approx(expected_losses[step], rel=1e-6), step
  _assert_same_params([x for _, x in _named_leaves(finished.params)],
                      _named_leaves(expected.params))
  final_eval = [[m for m in _metrics(w) if "eval/loss" in m][-1] for w in (workdir, reference)]
  assert final_eval[0]["step"] == final_eval[1]["step"] == VAE_STEPS
  for name in ("eval/loss", "eval/psnr"):
    assert final_eval[0][name] == pytest.approx(final_eval[1][name], rel=1e-5)


def _run_worker(tmp_path, mode, launch_args, **args):
  out = tmp_path / f"{mode}_out"
  out.mkdir()
  path = tmp_path / f"{mode}_args.json"
  path.write_text(json.dumps(dict(args, out=str(out))))
  run = Launch(launch_args, [sys.executable, "tests/multihost_worker.py", mode, str(path)])
  return run, out


def test_fid_features_on_two_processes_match_one_process(random_fid_weights, tmp_path):
  """FID features and statistics of 3 images on 2 processes x 1 device (the
  job described by SLURM variables: JAX's SLURM discovery), as the training
  loop and sample.py ask for them, against this process on 2 devices."""
  run, out = _run_worker(tmp_path, "fid", ["--num_processes=2", "--env=slurm"],
                         fid_weights=random_fid_weights)
  expected = multihost_worker.fid_outputs(random_fid_weights, parallel.make_mesh(2))
  assert run.wait(600) == 0, run.output[-5000:]
  for index in range(2):
    result = np.load(out / f"process_{index}.npz")
    assert (int(result["process_count"]), int(result["device_count"])) == (2, 2)
    # Every process gets the features of all 3 images, as one process does.
    assert result["features"].shape == (3, 2048)
    for name in ("features", "mu", "sigma"):
      np.testing.assert_allclose(result[name], expected[name], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(os.environ.get("LDM_JAX_MULTIHOST_LDM") != "1",
                    reason="several CPU-minutes: set LDM_JAX_MULTIHOST_LDM=1")
def test_ldm_on_two_processes_matches_one_process(
    tiny_data_dir, vae_workdir, ldm_workdir, tmp_path):
  """The tiny LDM as the shared 8-device run of conftest (6 steps; its final
  eval samples the picture), on 2 processes x 4 devices found through SLURM's
  variables."""
  workdir = str(tmp_path / "two_processes")
  run, out = _run_worker(
      tmp_path, "ldm", ["--num_processes=2", "--devices_per_process=4", "--env=slurm"],
      config=config_lib.to_json(ldm_config(tiny_data_dir, vae_workdir)), workdir=workdir)
  _, _, expected = runs.load_run(ldm_workdir)
  assert run.wait(1800) == 0, run.output[-5000:]

  results = [np.load(out / f"process_{index}.npz") for index in range(2)]
  for result in results:
    assert (int(result["process_count"]), int(result["device_count"])) == (2, 8)
  ours, theirs = _losses(workdir), _losses(ldm_workdir)
  assert [step for step, _ in ours] == [step for step, _ in theirs] == [3, 6]
  for (_, a), (_, b) in zip(ours, theirs):
    assert a == pytest.approx(b, rel=1e-5)
  evals = [[m["eval/loss"] for m in _metrics(w) if "eval/loss" in m] for w in (workdir, ldm_workdir)]
  assert evals[0] == pytest.approx(evals[1], rel=1e-5) and len(evals[0]) == 1
  expected_params = _named_leaves(expected.params)
  params = [[result[f"param_{i}"] for i in range(len(expected_params))] for result in results]
  for a, b in zip(*params):
    np.testing.assert_array_equal(a, b)  # The processes hold one replicated state.
  _assert_same_params(params[0], expected_params)
  # Sampling: the eval picture, drawn by both processes and saved by process 0.
  pictures = [np.asarray(Image.open(os.path.join(w, "samples.png")), np.int32)
              for w in (workdir, ldm_workdir)]
  assert pictures[0].shape == pictures[1].shape
  assert np.abs(pictures[0] - pictures[1]).max() <= 1  # uint8 rounding at most.
  assert pictures[0].std() > 0
