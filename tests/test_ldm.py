"""The latent diffusion stage, sampling over devices, and sample.py."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

import sample
from conftest import ldm_config
from ldm_jax import data, diffusion, models, parallel, runs, sampling, train_loop
from ldm_jax.stages import ldm as ldm_stage


def test_ldm_run_keeps_vae_frozen_and_tracks_ema(ldm_workdir, vae_workdir):
  saved, _, state = runs.load_run(ldm_workdir)
  _, _, vae_state = runs.load_run(vae_workdir)
  assert saved["stage"] == "ldm"
  assert saved["vae"]["model"]["latent"] == "spatial"  # Copied from the VAE run.
  for frozen, trained in zip(jax.tree.leaves(state.frozen["vae"]["params"]),
                             jax.tree.leaves(vae_state.params)):
    np.testing.assert_array_equal(frozen, trained)
  scale = float(state.frozen["latent_scale"])
  assert np.isfinite(scale) and scale > 0
  moved = [not np.allclose(e, p) for e, p in zip(jax.tree.leaves(state.ema_params),
                                                 jax.tree.leaves(state.params))]
  assert any(moved)  # EMA lags the parameters.
  assert os.path.getsize(os.path.join(ldm_workdir, "samples.png")) > 0


def test_vae_with_the_wrong_latent_form_is_refused(tiny_data_dir, vae_workdir, tmp_path):
  config = ldm_config(tiny_data_dir, vae_workdir)
  config.ldm.latent = "vector"
  with pytest.raises(ValueError, match="'spatial' latent, but .* needs a 'vector' one"):
    train_loop.train_and_evaluate(config, str(tmp_path / "ldm"))


def test_ldm_without_vae_checkpoint_is_refused(tiny_data_dir, tmp_path):
  config = ldm_config(tiny_data_dir, None)
  with pytest.raises(ValueError, match="vae_checkpoint"):
    train_loop.train_and_evaluate(config, str(tmp_path / "ldm"))


def test_tiny_denoiser_loss_goes_down_on_generated_latents():
  """Latents from two Gaussian clusters picked by the class: learnable."""
  schedule = diffusion.make_schedule("linear", 100)
  model = models.make_denoiser("mlp", latent_shape=(8,), num_classes=2, hidden_dim=64,
                               num_blocks=2, emb_dim=32, rngs=nnx.Rngs(0))
  labels = jnp.arange(64) % 2
  latents = (2.0 * labels[:, None] - 1.0) + 0.1 * jax.random.normal(jax.random.PRNGKey(1), (64, 8))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  def loss_fn(model, rng):
    return diffusion.diffusion_loss(schedule, lambda z, t: model(z, t, labels), latents, rng).mean()

  @nnx.jit
  def train_step(model, optimizer, rng):
    loss, grads = nnx.value_and_grad(loss_fn)(model, rng)
    optimizer.update(model, grads)
    return loss

  eval_keys = jax.random.split(jax.random.PRNGKey(2), 8)
  evaluate = nnx.jit(lambda model: jnp.mean(jnp.stack([loss_fn(model, k) for k in eval_keys])))
  before = float(evaluate(model))
  for step in range(60):
    train_step(model, optimizer, jax.random.PRNGKey(100 + step))
  after = float(evaluate(model))
  assert after < 0.6 * before


def test_samples_are_the_same_on_one_and_eight_devices(ldm_workdir):
  saved, graphdef, state = runs.load_run(ldm_workdir)
  stage = runs.make_stage(ml_collections.ConfigDict(saved))
  settings = sampling.SamplerSettings("ddim", num_steps=3, guidance=2.0)
  labels = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], np.int32)
  outputs = [
      sampling.generate(stage.decoder(graphdef), settings, state.ema_params, state.rest,
                        state.frozen, labels, seed=3, batch_size=8,
                        mesh=parallel.make_mesh(n))
      for n in (8, 1)]
  assert outputs[0].shape == (10, 32, 32, 3) and outputs[0].dtype == np.uint8
  diff = np.abs(outputs[0].astype(int) - outputs[1].astype(int))
  assert diff.max() <= 1  # Equal up to a rounding step at a uint8 boundary.
  assert (diff == 0).mean() > 0.99


def test_clip_x0_reaches_the_sampler(ldm_workdir):
  # A clip that never bites changes nothing; a tight one changes the images.
  saved, graphdef, state = runs.load_run(ldm_workdir)
  stage = runs.make_stage(ml_collections.ConfigDict(saved))
  labels = np.arange(8, dtype=np.int32)
  outputs = {}
  for clip in (None, 1e6, 0.05):
    settings = sampling.SamplerSettings("dpm_solver", num_steps=3, guidance=2.0, clip_x0=clip)
    outputs[clip] = sampling.generate(stage.decoder(graphdef), settings, state.ema_params,
                                      state.rest, state.frozen, labels, seed=3, batch_size=8,
                                      mesh=parallel.make_mesh(8)).astype(int)
  # Two compiled programs: equal up to a rounding step at a uint8 boundary.
  unbitten = np.abs(outputs[1e6] - outputs[None])
  assert unbitten.max() <= 1 and (unbitten == 0).mean() > 0.999
  assert np.abs(outputs[0.05] - outputs[None]).mean() > 5


def test_autoguidance_by_the_model_itself_changes_nothing(ldm_workdir):
  # cond - guide is zero when the guide is the model: the images are plain
  # classifier-free guidance's. An earlier checkpoint as the guide changes them.
  saved, graphdef, state = runs.load_run(ldm_workdir)
  _, _, earlier = runs.load_run(ldm_workdir, 3)
  stage = runs.make_stage(ml_collections.ConfigDict(saved))
  labels = np.arange(8, dtype=np.int32)

  def generate(guide_params, **auto):
    settings = sampling.SamplerSettings("dpm_solver", num_steps=3, guidance=2.0, **auto)
    return sampling.generate(stage.decoder(graphdef), settings, state.ema_params, state.rest,
                             state.frozen, labels, seed=3, batch_size=8,
                             mesh=parallel.make_mesh(8), guide_params=guide_params).astype(int)

  plain = generate(None)
  itself = generate(state.ema_params, autoguidance=3.0, guide_step=int(state.step))
  same = np.abs(itself - plain)
  assert same.max() <= 1 and (same == 0).mean() > 0.999  # Two compiled programs.
  guided = generate(earlier.ema_params, autoguidance=3.0, guide_step=3)
  # Most pixels move (the model's own guide moves under 0.1 % of them, by 1).
  assert (guided != plain).mean() > 0.3 and np.abs(guided - plain).mean() > 0.5
  with pytest.raises(ValueError, match="guide parameters missing"):
    generate(None, autoguidance=3.0, guide_step=3)
  with pytest.raises(ValueError, match="guide parameters given"):
    generate(earlier.ema_params)


@pytest.mark.parametrize("fields, message", [
    (dict(autoguidance=2.0), "needs a guide_step"),
    (dict(guide_step=3), "needs a guide_step"),
    (dict(autoguidance=0.5, guide_step=3), ">= 1"),
])
def test_autoguidance_settings_are_checked(fields, message):
  with pytest.raises(ValueError, match=message):
    sampling.SamplerSettings("ddim", num_steps=3, **fields)


def test_run_settings_take_autoguidance_from_the_run():
  config = dict(sampler="ddim", sample_steps=3, guidance=2.0, autoguidance=2.0, guide_step=3)
  assert sampling.run_settings(config) == sampling.SamplerSettings(
      "ddim", num_steps=3, guidance=2.0, autoguidance=2.0, guide_step=3)
  # Turned off by the caller; a run saved before the keys existed has none.
  assert sampling.run_settings(config, autoguidance=1.0).guide_step is None
  del config["autoguidance"], config["guide_step"]
  assert sampling.run_settings(config).autoguidance == 1.0


def test_sampling_into_a_resume_dir_continues_where_it_stopped(ldm_workdir, tmp_path):
  saved, graphdef, state = runs.load_run(ldm_workdir)
  stage = runs.make_stage(ml_collections.ConfigDict(saved))
  settings = sampling.SamplerSettings("ddim", num_steps=2, guidance=2.0)
  labels = np.arange(20, dtype=np.int32) % 10
  mesh = parallel.make_mesh(8)

  def generate(resume_dir, settings=settings, seed=3):
    return sampling.generate(stage.decoder(graphdef), settings, state.ema_params, state.rest,
                             state.frozen, labels, seed=seed, batch_size=8, mesh=mesh,
                             resume_dir=resume_dir)

  plain = generate(None)
  resume_dir = str(tmp_path / "batches")
  np.testing.assert_array_equal(generate(resume_dir), plain)
  batches = sorted(f for f in os.listdir(resume_dir) if f.startswith("batch_"))
  assert batches == ["batch_00000.npy", "batch_00001.npy", "batch_00002.npy"]
  # A job killed after two batches: the saved ones are read back, not sampled again
  # (a marked batch stays marked), and the missing one is sampled as before.
  os.remove(os.path.join(resume_dir, "batch_00002.npy"))
  marked = np.load(os.path.join(resume_dir, "batch_00000.npy"))
  marked[0] = 7
  np.save(os.path.join(resume_dir, "batch_00000.npy"), marked)
  resumed = generate(resume_dir)
  np.testing.assert_array_equal(resumed[0], np.full_like(plain[0], 7))
  np.testing.assert_array_equal(resumed[1:], plain[1:])
  # Batches of another job are never mixed in.
  for other in (dict(seed=4), dict(settings=sampling.SamplerSettings("ddim", num_steps=3))):
    with pytest.raises(ValueError, match="another sampling job"):
      generate(resume_dir, **other)


def run_sample(workdir, out, **overrides):
  kwargs = dict(num_samples=12, sampler="ddim", steps=3, guidance=2.0, batch_size=8,
                grid_per_class=3)
  kwargs.update(overrides)
  return sample.run(workdir, str(out), **kwargs)


def test_sample_py_stopped_while_sampling_continues_from_its_batches(
    ldm_workdir, tmp_path, monkeypatch):
  uninterrupted = tmp_path / "uninterrupted"
  run_sample(ldm_workdir, uninterrupted)
  calls = []
  real_sample_batch = sampling._sample_batch

  def sample_batch(*args):
    calls.append(1)
    if stop_at_call[0] == len(calls):
      raise KeyboardInterrupt  # The job is stopped while its second batch samples.
    return real_sample_batch(*args)

  monkeypatch.setattr(sampling, "_sample_batch", sample_batch)
  out = tmp_path / "out"
  stop_at_call = [2]
  with pytest.raises(KeyboardInterrupt):
    run_sample(ldm_workdir, out)
  assert not (out / "samples.npz").exists()
  kept = list((out / "batches").rglob("batch_*.npy"))
  assert [p.name for p in kept] == ["batch_00000.npy"]
  calls.clear()
  stop_at_call = [0]
  run_sample(ldm_workdir, out)  # The same --out: continues.
  assert len(calls) == 1  # Only the batch that was missing is sampled.
  assert not (out / "batches").exists()
  for key in ("images", "labels"):
    np.testing.assert_array_equal(np.load(out / "samples.npz")[key],
                                  np.load(uninterrupted / "samples.npz")[key])
  with pytest.raises(FileExistsError):  # Finished: the folder is not reused.
    run_sample(ldm_workdir, out)


def test_sample_py_writes_all_outputs(ldm_workdir, tmp_path):
  out = tmp_path / "out"
  result = run_sample(ldm_workdir, out, classes=["1", "class_02"])
  assert result["num_samples"] == 12
  files = sorted(os.listdir(out / "generated_samples"))
  assert len(files) == 12
  assert files[0] == "00000_class_01.png" and files[1] == "00001_class_02.png"
  saved = np.load(out / "samples.npz")
  assert saved["images"].shape == (12, 32, 32, 3) and saved["images"].dtype == np.uint8
  assert list(saved["labels"]) == [1, 2] * 6
  for name in ("grid_samples.png", "comparison.png"):
    assert os.path.getsize(out / name) > 0


@pytest.mark.parametrize("overrides, error, message", [
    (dict(classes=["100"]), ValueError, "out of range"),
    (dict(classes=["no_such_class"]), ValueError, "unknown class"),
    (dict(sampler="euler"), ValueError, "unknown sampler"),
    (dict(sampler="dpm_solver", eta=0.5), ValueError, "eta"),
    (dict(clip_x0=-1.0), ValueError, "clip_x0"),
])
def test_sample_py_rejects_bad_input_before_writing(ldm_workdir, tmp_path, overrides, error,
                                                    message):
  out = tmp_path / "out"
  with pytest.raises(error, match=message):
    run_sample(ldm_workdir, out, **overrides)
  assert not (out / "generated_samples").exists()


def test_run_settings_take_the_runs_sampler_unless_given():
  run_eval = {"sampler": "ddim", "sample_steps": 7, "guidance": 3.0, "clip_x0": 2.5}
  assert sampling.run_settings(run_eval) == sampling.SamplerSettings(
      "ddim", num_steps=7, guidance=3.0, clip_x0=2.5)
  assert sampling.run_settings(run_eval, sampler="dpm_solver", steps=4, guidance=0.0,
                               clip_x0=1.0) == sampling.SamplerSettings(
                                   "dpm_solver", num_steps=4, guidance=0.0, clip_x0=1.0)
  assert sampling.run_settings(run_eval, clip_x0=sample.NO_CLIP).clip_x0 is None
  older = {k: v for k, v in run_eval.items() if k != "clip_x0"}  # Saved before clip_x0.
  assert sampling.run_settings(older).clip_x0 is None


def test_sample_py_needs_an_ldm_checkpoint(vae_workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    run_sample(str(tmp_path / "empty"), tmp_path / "out")
  with pytest.raises(ValueError, match="needs an LDM run"):
    run_sample(vae_workdir, tmp_path / "out")


def test_sample_py_never_overwrites(ldm_workdir, tmp_path):
  out = tmp_path / "out"
  (out / "generated_samples").mkdir(parents=True)
  with pytest.raises(FileExistsError, match="nothing is overwritten"):
    run_sample(ldm_workdir, out)


def cached_config(data_dir, vae_workdir, cache_latents=True, **kw):
  """The tiny LDM on unpadded flips, the stream a latent cache can stand for."""
  config = ldm_config(data_dir, vae_workdir, **kw)
  config.data.crop_padding = 0
  config.ldm.cache_latents = cache_latents
  return config


def test_latent_cache_gives_the_encoders_posteriors_and_losses(
    tiny_data_dir, vae_workdir, ldm_workdir):
  _, graphdef, state = runs.load_run(ldm_workdir)
  config = cached_config(tiny_data_dir, vae_workdir)
  runs.attach_vae_config(config)
  stage = runs.make_stage(config)
  mesh = parallel.make_mesh()
  stage.prepare_training(state.frozen, mesh)
  batch = next(data.train_iterator(config.data, 16, seed=3))
  assert 0 < batch["flip"].sum() < 16  # Both orientations are looked up.
  cached = stage.train_batch(batch)
  assert set(cached) == {"posterior", "label"}  # The loss cannot run the encoder.

  _, vae_graphdef, vae_state = runs.load_run(vae_workdir)
  vae = nnx.merge(vae_graphdef, vae_state.eval_params(), vae_state.rest)
  mean, logvar = jax.jit(lambda x: vae.encode(x))(batch["image"])
  np.testing.assert_allclose(cached["posterior"], np.concatenate([mean, logvar], -1),
                             atol=1e-5, rtol=1e-5)

  @jax.jit
  def loss(params, rest, frozen, batch):
    model = nnx.merge(graphdef, params, rest)
    return stage.loss(model, frozen, batch, jax.random.PRNGKey(7))[0]

  encoded = parallel.shard_batch(mesh, {k: batch[k] for k in ("image", "label")})
  np.testing.assert_allclose(
      float(loss(state.params, state.rest, state.frozen, parallel.shard_batch(mesh, cached))),
      float(loss(state.params, state.rest, state.frozen, encoded)), rtol=1e-5)


def test_a_run_with_the_latent_cache_trains_as_one_without(tiny_data_dir, vae_workdir, tmp_path,
                                                           monkeypatch):
  fed = []  # What the loop handed the train step in the cached run.
  original = ldm_stage.LDMStage.train_batch
  monkeypatch.setattr(ldm_stage.LDMStage, "train_batch",
                      lambda self, batch: fed.append(original(self, batch)) or fed[-1])
  losses = {}
  for cache in (False, True):
    fed.clear()
    workdir = str(tmp_path / f"cache_{cache}")
    train_loop.train_and_evaluate(
        cached_config(tiny_data_dir, vae_workdir, cache_latents=cache, num_steps=3), workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = [json.loads(line) for line in f]
    losses[cache] = [r["train/loss"] for r in records if "train/loss" in r]
  assert len(fed) == 3 and all(set(b) == {"posterior", "label"} for b in fed)
  assert len(losses[True]) == 1
  np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)


def test_latent_cache_with_crops_is_refused_before_any_work(tiny_data_dir, vae_workdir,
                                                            tmp_path):
  config = cached_config(tiny_data_dir, vae_workdir)
  config.data.crop_padding = 4
  with pytest.raises(ValueError, match="caches flips only"):
    train_loop.train_and_evaluate(config, str(tmp_path / "ldm"))
  assert not os.path.exists(tmp_path / "ldm")
