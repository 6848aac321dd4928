"""The main job (train.py with a pipeline recipe): both stages, samples, FID."""

import importlib
import json
import os
import shutil

import numpy as np
import pytest

from configs import tiny_pipeline
from ldm_jax import pipeline, sample_job, train_loop
from ldm_jax.fid import stats


def pipeline_config(data_dir, weights, reference=None):
  config = tiny_pipeline.get_config()
  config.data.data_dir = data_dir
  config.fid.weights = weights
  config.fid.reference = reference
  return config


@pytest.fixture(scope="module")
def reference_stats(tmp_path_factory):
  rng = np.random.default_rng(0)
  features = rng.normal(size=(64, stats.FEATURE_DIM))
  path = str(tmp_path_factory.mktemp("stats") / "reference.npz")
  stats.save_statistics(path, *stats.feature_statistics(features), dataset="fake")
  return path


@pytest.fixture(scope="module")
def main_job(tiny_data_dir, random_fid_weights, reference_stats, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("main_job"))
  config = pipeline_config(tiny_data_dir, random_fid_weights, reference_stats)
  return config, workdir, pipeline.run(config, workdir)


def test_main_job_writes_every_output(main_job):
  config, workdir, results = main_job
  for stage in ("vae", "ldm"):
    assert os.path.isdir(os.path.join(workdir, stage, "checkpoints"))
  samples = os.path.join(workdir, "samples")
  for name in ("generated_samples", "grid_samples.png", "comparison.png", "samples.npz"):
    assert os.path.exists(os.path.join(samples, name)), name
  with np.load(os.path.join(samples, "samples.npz")) as saved:
    assert saved["images"].shape == (16, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(saved["labels"][:8], minlength=8)[:8], 1)
  assert len(os.listdir(os.path.join(samples, "generated_samples"))) == 16
  with open(os.path.join(workdir, "results.json")) as f:
    on_disk = json.load(f)
  assert on_disk == results and results["complete"]
  for key in ("fid_8", "fid_16", "vae_rfid_16"):
    assert np.isfinite(results[key]) and results[key] > 0, key
  assert results["fid_8"] != results["fid_16"]  # Over different sample counts.
  assert (results["sampler"], results["sampler_steps"], results["num_samples"],
          results["clip_x0"]) == (config.sample.sampler, 3, 16, 4.0)
  # The guide of autoguidance is an LDM checkpoint off the saving grid, kept.
  assert (results["autoguidance"], results["guide_step"]) == (2.0, 5)
  assert "w=2.0, autoguidance 2.0 by step 5)" in pipeline.summary(results)
  with open(os.path.join(workdir, "ldm", "config.json")) as f:
    assert json.load(f)["train"]["keep_steps"] == [5]
  assert os.path.isdir(os.path.join(workdir, "ldm", "checkpoints", "5"))
  assert set(results["seconds"]) == {"vae", "ldm", "sample", "fid", "total"}
  assert all(v > 0 for v in results["seconds"].values())
  # The LDM was trained on this job's VAE.
  with open(os.path.join(workdir, "ldm", "config.json")) as f:
    assert json.load(f)["vae_checkpoint"] == os.path.join(workdir, "vae")


def test_main_job_fid_matches_the_fid_of_its_samples(main_job, random_fid_weights,
                                                     reference_stats):
  _, workdir, results = main_job
  from ldm_jax.fid import reference
  with np.load(os.path.join(workdir, "samples", "samples.npz")) as saved:
    images = saved["images"][:8]
  model = reference.cached_model(random_fid_weights)
  mu, sigma = model.statistics(images, batch_size=16, progress=False)
  mu_ref, sigma_ref, _ = stats.load_statistics(reference_stats)
  np.testing.assert_allclose(stats.frechet_distance(mu, sigma, mu_ref, sigma_ref),
                             results["fid_8"], rtol=1e-6)


def test_sample_py_on_the_ldm_stage_repeats_the_main_jobs_samples(main_job, tmp_path):
  """The job's sampler settings are the LDM run's own, so sample.py needs none."""
  config, workdir, _ = main_job
  ldm_workdir = os.path.join(workdir, "ldm")
  with open(os.path.join(ldm_workdir, "config.json")) as f:
    run_eval = json.load(f)["eval"]
  settings = config.sample
  assert (run_eval["sampler"], run_eval["sample_steps"], run_eval["guidance"],
          run_eval["clip_x0"], run_eval["autoguidance"], run_eval["guide_step"]) == (
              settings.sampler, settings.steps, settings.guidance, settings.clip_x0,
              settings.autoguidance, settings.guide_step)
  result = sample_job.run(ldm_workdir, str(tmp_path / "again"), num_samples=settings.num_samples,
                          seed=settings.seed, batch_size=settings.batch_size)
  assert result["sampler"]["clip_x0"] == settings.clip_x0
  assert result["sampler"]["guide_step"] == settings.guide_step
  with np.load(os.path.join(workdir, "samples", "samples.npz")) as first, \
      np.load(tmp_path / "again" / "samples.npz") as again:
    np.testing.assert_array_equal(again["images"], first["images"])


def test_rerun_retrains_nothing(main_job):
  config, workdir, results = main_job
  stamps = {name: os.path.getmtime(os.path.join(workdir, name, "metrics.jsonl"))
            for name in ("vae", "ldm")}
  again = pipeline.run(config, workdir)
  assert again == results  # Same figures, same times: nothing ran again.
  for name, stamp in stamps.items():
    assert os.path.getmtime(os.path.join(workdir, name, "metrics.jsonl")) == stamp


def test_interrupted_job_resumes_the_unfinished_stage(main_job, tmp_path):
  config, finished, _ = main_job
  config = config.copy_and_resolve_references()
  config.fid.update(sample_counts=(), vae_reconstructions=0)
  workdir = str(tmp_path / "job")
  # As if the first attempt stopped in the LDM stage: the VAE is complete (a
  # copy of the finished job's), the LDM ran half its steps.
  shutil.copytree(os.path.join(finished, "vae"), os.path.join(workdir, "vae"))
  ldm_workdir, ldm_config = pipeline.stage_configs(config, workdir)[1][1:]
  ldm_config.train.num_steps = 10
  train_loop.train_and_evaluate(ldm_config, ldm_workdir)
  vae_stamp = os.path.getmtime(os.path.join(workdir, "vae", "metrics.jsonl"))
  results = pipeline.run(config, workdir)
  assert results["complete"] and "vae" not in results["seconds"]  # Not retrained.
  assert os.path.getmtime(os.path.join(workdir, "vae", "metrics.jsonl")) == vae_stamp
  with open(os.path.join(ldm_workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert max(steps) == 20 and 15 in steps  # Continued past the first attempt's end.


@pytest.mark.parametrize("override, message", [
    (dict(sample=dict(sampler="euler")), "unknown sampler"),
    (dict(fid=dict(sample_counts=(8, 64))), "sample_counts"),
    (dict(fid=dict(reference="/nonexistent/stats.npz")), "does not exist"),
    (dict(ldm_stage=dict(train=dict(batch_size=12))), "ldm_stage.train.batch_size"),
    (dict(ldm_stage=dict(ldm=dict(latent="vector"))), "needs a 'vector' one"),
    (dict(sample=dict(guide_step=20)), "must be a step of the LDM"),
    (dict(sample=dict(autoguidance=1.0)), "needs a guide_step"),
])
def test_bad_config_is_refused_before_any_work(tiny_data_dir, random_fid_weights, tmp_path,
                                               override, message):
  config = pipeline_config(tiny_data_dir, random_fid_weights)
  for section, values in override.items():
    for key, value in values.items():
      if isinstance(value, dict):
        config[section][key].update(value)
      else:
        config[section][key] = value
  workdir = tmp_path / "job"
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    pipeline.run(config, str(workdir))
  assert not workdir.exists()


def test_workdir_that_is_a_file_is_refused(tiny_data_dir, random_fid_weights, tmp_path):
  workdir = tmp_path / "job"
  workdir.write_text("not a directory")
  with pytest.raises(NotADirectoryError, match="is a file"):
    pipeline.run(pipeline_config(tiny_data_dir, random_fid_weights), str(workdir))
  assert workdir.read_text() == "not a directory"


def test_fid_keys():
  assert [pipeline.fid_key(n) for n in (512, 2000, 10_000, 2048)] == [
      "fid_512", "fid_2k", "fid_10k", "fid_2048"]


@pytest.mark.parametrize("recipe", ["cifar100", "cifar100_cpu"])
def test_committed_main_job_recipes_pass_the_checks(recipe, random_fid_weights, tmp_path):
  """The full-size recipes pass what `pipeline.run` checks before any work."""
  config = importlib.import_module(f"configs.{recipe}").get_config()
  config.fid.weights = random_fid_weights
  pipeline.validate(config, str(tmp_path / "job"))  # Raises on what it finds wrong.
