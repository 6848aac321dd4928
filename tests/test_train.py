"""The shared training loop: sharding, checkpoints, resumption, failure modes.

Runs are tiny (8-channel VAE, 16-image batches) and share one trained workdir
per stage through session fixtures; copies are made where a test changes one.
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import PreemptedAfter, ldm_config, vae_config
from ldm_jax import checkpoint, config as config_lib, data, parallel, runs, train_loop, train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def flat_params(state):
  return jax.tree.leaves(jax.device_get(state.params))


def test_run_writes_checkpoints_metrics_and_pictures(vae_workdir):
  with checkpoint.Checkpointer(runs.checkpoint_dir(vae_workdir), read_only=True) as ckpt:
    assert ckpt.all_steps() == [5, 10]
    assert ckpt.restore_config()["stage"] == "vae"
  metrics = read_metrics(vae_workdir)
  train = [m for m in metrics if "train/loss" in m]
  evals = [m for m in metrics if "eval/loss" in m]
  assert [m["step"] for m in train] == [5, 10]
  assert train[-1]["train/loss"] < train[0]["train/loss"]
  assert [m["step"] for m in evals] == [10]
  assert {"eval/psnr", "eval/kl", "eval/reconstruction"} <= set(evals[0])
  assert os.path.getsize(os.path.join(vae_workdir, "comparison.png")) > 0
  assert os.listdir(os.path.join(vae_workdir, "tensorboard"))
  with open(os.path.join(vae_workdir, "config.json")) as f:
    assert json.load(f)["train"]["batch_size"] == 16


def test_checkpoints_keep_the_latest_and_the_best(tmp_path):
  state = {"x": jnp.zeros(3)}
  with checkpoint.Checkpointer(tmp_path / "ckpt", keep=2) as ckpt:
    ckpt.save(1, state, {}, metrics={checkpoint.BEST_METRIC: 0.5})
    ckpt.save(2, state, {}, metrics={checkpoint.BEST_METRIC: 0.9})
    ckpt.save(3, state, {})
    ckpt.save(4, state, {}, metrics={checkpoint.BEST_METRIC: 0.7})
    ckpt.wait()
    assert ckpt.all_steps() == [1, 3, 4]  # Step 1 is the best; 3 and 4 the latest.


def test_keep_steps_are_saved_and_never_deleted(tiny_data_dir, tmp_path):
  # Step 7 lies off the checkpoint grid (every 5) and outlives keep=1; the
  # other grid steps are deleted as usual.
  config = vae_config(tiny_data_dir)
  config.train.update(num_steps=20, eval_every=20, keep_checkpoints=1, keep_steps=(7,))
  workdir = str(tmp_path / "run")
  train_loop.train_and_evaluate(config, workdir)
  with checkpoint.Checkpointer(runs.checkpoint_dir(workdir), read_only=True) as ckpt:
    assert ckpt.all_steps() == [7, 20]


def test_sharded_step_equals_single_device_step(tiny_data_dir):
  """Same loss and parameters after two steps on 8 devices as on 1.

  Plain SGD here: Adam divides each gradient element by its own magnitude, so
  elements whose true gradient is zero (a conv bias feeding a GroupNorm) take
  +-lr steps decided by rounding noise, which differs with the reduction
  order. SGD passes the data-parallel gradient through unchanged.
  """
  import optax
  config = vae_config(tiny_data_dir)
  stage = runs.make_stage(config)
  batch = next(data.train_iterator(config.data, config.train.batch_size, seed=0))
  results = []
  for num_devices in (8, 1):
    mesh = parallel.make_mesh(num_devices)
    schedule = optax.constant_schedule(0.1)
    tx = optax.sgd(schedule)
    graphdef, state = runs.init_model_and_state(stage, config, frozen=None)
    state = parallel.replicate(mesh, state.replace(opt_state=tx.init(state.params)))
    step, _ = train_state.compile_steps(
        mesh, graphdef, state,
        train_state.make_train_step(graphdef, stage.loss, tx, schedule, None),
        train_state.make_eval_step(graphdef, stage.eval_metrics))
    sharded_batch = parallel.shard_batch(mesh, batch)
    assert len(sharded_batch["image"].sharding.device_set) == num_devices
    for _ in range(2):
      state, metrics = step(state, sharded_batch)
    results.append((float(metrics["loss"]), flat_params(state)))
  (loss8, params8), (loss1, params1) = results
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  for a, b in zip(params8, params1):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_each_eval_batch_draws_its_own_randomness(tiny_data_dir):
  """The eval key differs between the batches of one pass and repeats for the same one
  at every step, and the eval pass numbers its batches.

  A stand-in metric that is the key's own uniform draw shows what the stage's
  noise and timesteps would see.
  """
  config = vae_config(tiny_data_dir)
  config.eval.update(batch_size=16, num_examples=32)
  stage = runs.make_stage(config)
  mesh = parallel.make_mesh(8)
  graphdef, state = runs.init_model_and_state(stage, config, frozen=None)
  state = parallel.replicate(mesh, state)
  draw = lambda model, frozen, batch, rng: dict(loss=jax.random.uniform(rng, batch["mask"].shape))
  _, evaluate = train_state.compile_steps(
      mesh, graphdef, state, train_state.make_train_step(graphdef, stage.loss, None, None, None),
      train_state.make_eval_step(graphdef, draw))
  batch = parallel.shard_batch(mesh, next(iter(data.eval_batches(config.data, 16, num_examples=16))))
  first, again, second = (float(evaluate(state, batch, np.int32(n))["loss"]) for n in (0, 0, 1))
  assert first == again
  assert first != second
  # The same draws at another step: evals compare across a run and between runs.
  later = state.replace(step=state.step + 1234)
  assert float(evaluate(later, batch, np.int32(0))["loss"]) == first
  # Two batches of 16: the pass's mean is that of batch 0's draws and batch 1's.
  expected = sum(float(evaluate(state, parallel.shard_batch(mesh, b), np.int32(n))["loss"])
                 for n, b in enumerate(data.eval_batches(config.data, 16, num_examples=32))) / 32
  np.testing.assert_allclose(train_loop._evaluate(config, mesh, evaluate, state)["loss"],
                             expected, rtol=1e-6)


def test_batch_not_divisible_by_devices_is_a_clear_error():
  with pytest.raises(ValueError, match="multiple of the number of devices"):
    parallel.check_batch_size(12, parallel.make_mesh(8))


def test_resume_continues_exactly(vae_workdir, tiny_data_dir, tmp_path, monkeypatch):
  """Preempted after 5 of 10 steps, then rerun == 10 uninterrupted steps:
  same batches, same randomness, same parameters."""
  workdir = str(tmp_path / "resumed")
  monkeypatch.setattr(train_loop, "_Preemption", type("After5", (PreemptedAfter,), {"steps": 5}))
  stopped = train_loop.train_and_evaluate(vae_config(tiny_data_dir), workdir)
  assert int(stopped.step) == 5
  monkeypatch.undo()
  resumed = train_loop.train_and_evaluate(vae_config(tiny_data_dir), workdir)
  assert int(resumed.step) == 10
  _, _, uninterrupted = runs.load_run(vae_workdir, 10)
  for a, b in zip(flat_params(resumed), flat_params(uninterrupted)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
  ours, theirs = read_metrics(workdir), read_metrics(vae_workdir)
  final = lambda metrics: [m for m in metrics if m["step"] == 10 and "train/loss" in m][0]
  assert final(ours)["train/loss"] == pytest.approx(final(theirs)["train/loss"], rel=1e-6)


def test_restore_on_a_different_device_count(vae_workdir):
  _, _, on8 = runs.load_run(vae_workdir, mesh=parallel.make_mesh(8))
  _, _, on1 = runs.load_run(vae_workdir, mesh=parallel.make_mesh(1))
  leaf1 = jax.tree.leaves(on1.params)[0]
  assert len(leaf1.sharding.device_set) == 1
  assert len(jax.tree.leaves(on8.params)[0].sharding.device_set) == 8
  for a, b in zip(flat_params(on8), flat_params(on1)):
    np.testing.assert_array_equal(a, b)


def test_incompatible_config_is_refused_and_nothing_changes(vae_workdir, tiny_data_dir):
  before = sorted(os.listdir(os.path.join(vae_workdir, "checkpoints")))
  with open(os.path.join(vae_workdir, "config.json")) as f:
    saved = f.read()
  config = vae_config(tiny_data_dir, num_steps=12)
  config.vae.model.channels = 16
  with pytest.raises(ValueError, match=r"vae\.model\.channels: saved 8, now 16"):
    train_loop.train_and_evaluate(config, vae_workdir)
  assert sorted(os.listdir(os.path.join(vae_workdir, "checkpoints"))) == before
  with open(os.path.join(vae_workdir, "config.json")) as f:
    assert f.read() == saved


def test_run_length_and_logging_changes_are_compatible(tiny_data_dir):
  config = vae_config(tiny_data_dir)
  saved = config_lib.to_json(config)
  config.train.num_steps = 40
  config.train.log_every = 1
  config.eval.num_examples = 8
  assert config_lib.incompatible_keys(saved, config) == []
  config.optim.learning_rate = 1e-4  # A diverged run goes on with a lower one.
  assert config_lib.incompatible_keys(saved, config) == []
  config.optim.weight_decay = 0.1
  assert config_lib.incompatible_keys(saved, config) == ["optim.weight_decay"]


def test_a_run_saved_before_a_key_existed_resumes_with_the_value_it_used(tiny_data_dir):
  config = ldm_config(tiny_data_dir, "runs/vae")  # Only compared, never opened.
  saved = config_lib.to_json(config)
  del saved["unet"]["attention_mlp_ratio"]  # As written before the key existed (MLP 4).
  del saved["unet"]["norm_groups"]  # Likewise (32 groups): today's default, so no change.
  # Today's default (no MLP) is another architecture: resuming must say so,
  # and the old value, given explicitly, resumes.
  assert config.unet.attention_mlp_ratio == 0
  assert config_lib.incompatible_keys(saved, config) == ["unet.attention_mlp_ratio"]
  config.unet.attention_mlp_ratio = 4
  assert config_lib.incompatible_keys(saved, config) == []


def copy_run(workdir, tmp_path):
  target = str(tmp_path / "copy")
  shutil.copytree(workdir, target)
  return target


def test_nan_loss_stops_and_keeps_last_good_checkpoint(vae_workdir, tiny_data_dir, tmp_path,
                                                       monkeypatch):
  workdir = copy_run(vae_workdir, tmp_path)
  from ldm_jax.stages import vae as vae_stage
  original = vae_stage.VAEStage.loss

  def poisoned(self, model, frozen, batch, rng):
    loss, metrics = original(self, model, frozen, batch, rng)
    return loss * jnp.nan, metrics

  monkeypatch.setattr(vae_stage.VAEStage, "loss", poisoned)
  with pytest.raises(train_loop.NonFiniteLossError, match="last good checkpoint is step 10"):
    train_loop.train_and_evaluate(vae_config(tiny_data_dir, num_steps=20), workdir)
  with checkpoint.Checkpointer(runs.checkpoint_dir(workdir), read_only=True) as ckpt:
    assert ckpt.latest_step() == 10


def test_finiteness_check_sees_one_bad_value_in_any_leaf_and_dtype():
  state = {"params": [jnp.ones((3, 2)), jnp.ones(4, jnp.bfloat16)], "step": jnp.array(7),
           "count": np.arange(3)}
  assert bool(train_loop._all_finite(state))
  for path, bad in ((("params", 0), np.nan), (("params", 1), np.inf), (("params", 1), -np.inf)):
    broken = jax.tree.map(lambda x: x, state)
    leaf = broken[path[0]][path[1]]
    broken[path[0]][path[1]] = leaf.at[-1].set(bad) if leaf.ndim == 1 else leaf.at[2, 1].set(bad)
    assert not bool(train_loop._all_finite(broken)), (path, bad)
  assert bool(train_loop._all_finite({"step": jnp.array(1)}))  # Nothing inexact to check.


def test_sigterm_sets_the_preemption_flag():
  with train_loop._Preemption() as preemption:
    assert not preemption.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.requested


def test_preemption_saves_a_checkpoint_and_stops(vae_workdir, tiny_data_dir, tmp_path,
                                                 monkeypatch):
  workdir = copy_run(vae_workdir, tmp_path)
  monkeypatch.setattr(train_loop, "_Preemption", type("After1", (PreemptedAfter,), {"steps": 1}))
  state = train_loop.train_and_evaluate(vae_config(tiny_data_dir, num_steps=20), workdir)
  assert int(state.step) == 11
  with checkpoint.Checkpointer(runs.checkpoint_dir(workdir), read_only=True) as ckpt:
    assert ckpt.latest_step() == 11


@pytest.mark.parametrize("override, message", [
    ("--config.train.bach_size=16", "bach_size"),
    ("--config.train.batch_size=sixteen", "batch_size"),
])
def test_bad_config_override_fails_before_running(override, message, tmp_path):
  workdir = tmp_path / "never"
  result = subprocess.run(
      [sys.executable, "train.py", "--config=configs/tiny_vae.py", f"--workdir={workdir}",
       override], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert message in result.stderr
  assert not workdir.exists()


def test_map_in_batches_keeps_row_order_and_drops_padding():
  mesh = parallel.make_mesh()
  inputs = np.arange(21 * 3, dtype=np.float32).reshape(21, 3)
  finished = []
  # 10 rounds up to 16 rows (8 devices): one full batch, one padded.
  out = parallel.map_in_batches(jax.jit(lambda x: 2 * x + 1), inputs, 10, mesh,
                                progress=finished.append)
  np.testing.assert_array_equal(out, 2 * inputs + 1)
  assert finished == [16, 5]
