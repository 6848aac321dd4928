"""The main job: the VAE, then the LDM on it, then samples and their FID.

  python train.py --config=configs/cifar100_cpu.py --workdir=W

A pipeline recipe holds one ordinary stage recipe per stage (`vae_stage`,
`ldm_stage`) and what to do afterwards (`sample`, `fid`); `data` and `seed`
are set once at the top and handed to both stages. Each stage is trained by
the one training loop in its own workdir, so everything that holds for a
single-stage run (resumption, pre-emption, checkpoints) holds here too:

  W/vae/          the VAE run
  W/ldm/          the LDM run (its VAE is W/vae)
  W/samples/      what sample.py writes (generated_samples/, grid_samples.png,
                  comparison.png, samples.npz)
  W/results.json  FID figures, the sampler and guidance used, each stage's
                  wall time, and whether the job is complete

Rerunning the command resumes the stage that was running and skips the
finished ones; wall times add up over the reruns.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from ldm_jax import checkpoint, data, files, parallel, runs, sample_job, sampling, train_loop
from ldm_jax.stages import ldm as ldm_stage

STAGE_KEYS = (("vae", "vae_stage"), ("ldm", "ldm_stage"))
RESULTS = "results.json"


def is_pipeline(config: ml_collections.ConfigDict) -> bool:
  return config.get("stage") == "pipeline"


def base_pipeline_config(vae_config: ml_collections.ConfigDict,
                         ldm_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A pipeline recipe around two stage recipes, with the sampling and FID
  settings of the main job. `data` and `seed` of the stages are replaced by
  the pipeline's own when it runs."""
  config = ml_collections.ConfigDict()
  config.stage = "pipeline"
  config.seed = 0
  config.data = data.default_data_config()
  config.vae_stage = vae_config
  config.ldm_stage = ldm_config
  config.sample = ml_collections.ConfigDict(dict(
      num_samples=2_000,  # Class-balanced: the first 512 are balanced too.
      sampler="dpm_solver",
      steps=20,
      guidance=2.0,
      # x0 clipping in the sampler (sampling.SamplerSettings.clip_x0); None: off.
      clip_x0=ml_collections.config_dict.placeholder(float),
      # Autoguidance (diffusion.guided_model_fn): the guide term's weight (1:
      # off) and the LDM checkpoint step that guides, which the LDM stage then
      # keeps (train.keep_steps).
      autoguidance=1.0,
      guide_step=ml_collections.config_dict.placeholder(int),
      use_ema=True,
      batch_size=250,
      seed=0,
  ))
  config.fid = ml_collections.ConfigDict(dict(
      # Sample FIDs to report, each over the first N samples (fid_512, fid_2k).
      sample_counts=(512, 2_000),
      # VAE reconstructions of this many test images scored too (0 = none):
      # their FID bounds what any LDM on this VAE can reach.
      vae_reconstructions=2_000,
      # Statistics .npz of the real train images (e.g. the shared
      # cifar100_train_stats.npz); None computes them once and caches them.
      reference=ml_collections.config_dict.placeholder(str),
      weights=ml_collections.config_dict.placeholder(str),
      batch_size=200,
  ))
  return config


def stage_configs(config: ml_collections.ConfigDict, workdir: str
                  ) -> list[tuple[str, str, ml_collections.ConfigDict]]:
  """(name, workdir, config) of each stage, with the pipeline's data and seed."""
  out = []
  for name, key in STAGE_KEYS:
    stage_config = ml_collections.ConfigDict(config[key].to_dict())
    stage_config.data = ml_collections.ConfigDict(config.data.to_dict())
    stage_config.seed = config.seed
    if name == "ldm":
      stage_config.vae_checkpoint = os.path.join(workdir, "vae")
      # The job's sampler becomes the run's: eval pictures show what the final
      # samples will look like, and sample.py on W/ldm defaults to it.
      settings = config.sample
      stage_config.eval.update(sampler=settings.sampler, sample_steps=settings.steps,
                               guidance=settings.guidance, clip_x0=settings.clip_x0,
                               autoguidance=settings.autoguidance,
                               guide_step=settings.guide_step)
      if settings.guide_step is not None:
        keep = set(stage_config.train.keep_steps) | {settings.guide_step}
        stage_config.train.keep_steps = tuple(sorted(keep))
    out.append((name, os.path.join(workdir, name), stage_config))
  return out


def fid_key(count: int) -> str:
  """results.json key of a FID over `count` images: fid_512, fid_2k, fid_10k."""
  return f"fid_{count // 1000}k" if count >= 1000 and count % 1000 == 0 else f"fid_{count}"


def validate(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Everything that can be checked before any work is done."""
  train_loop.check_workdir_path(workdir)
  vae_config, ldm_config = config.vae_stage, config.ldm_stage
  if vae_config.stage != "vae" or ldm_config.stage != "ldm":
    raise ValueError("a pipeline recipe needs vae_stage.stage='vae' and ldm_stage.stage='ldm', "
                     f"got {vae_config.stage!r} and {ldm_config.stage!r}")
  if vae_config.vae.model.latent != ldm_config.ldm.latent:
    raise ValueError(
        f"the VAE's latent is {vae_config.vae.model.latent!r}, but the "
        f"{ldm_config.ldm.denoiser!r} denoiser needs a {ldm_config.ldm.latent!r} one")
  mesh = parallel.make_mesh()
  for name, _, stage_config in stage_configs(config, workdir):
    if name == "ldm":
      ldm_stage.check_latent_cache(stage_config)
    try:
      parallel.check_batch_size(stage_config.train.batch_size, mesh)
    except ValueError as error:
      raise ValueError(f"{name}_stage.train.batch_size: {error}") from None
  settings = config.sample
  sampling.SamplerSettings(sampler=settings.sampler, num_steps=settings.steps,
                           guidance=settings.guidance, clip_x0=settings.clip_x0,
                           autoguidance=settings.autoguidance, guide_step=settings.guide_step)
  if settings.guide_step is not None and not (
      0 < settings.guide_step < ldm_config.train.num_steps):
    raise ValueError(f"sample.guide_step {settings.guide_step} must be a step of the LDM's "
                     f"training, in 1..{ldm_config.train.num_steps - 1}")
  counts = tuple(config.fid.sample_counts)
  if any(c < 2 for c in counts) or (counts and max(counts) > settings.num_samples):
    raise ValueError(f"fid.sample_counts {counts} must lie in 2..sample.num_samples "
                     f"({settings.num_samples})")
  if config.fid.reference is not None and not os.path.isfile(config.fid.reference):
    raise FileNotFoundError(f"fid.reference {config.fid.reference} does not exist")
  if counts or config.fid.vae_reconstructions:
    from ldm_jax.fid import weights as weights_lib
    weights_lib.find_weights(config.fid.weights)  # Says how to get them if missing.


def _stage_finished(workdir: str, num_steps: int) -> bool:
  directory = runs.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return False
  with checkpoint.Checkpointer(directory, read_only=True) as checkpointer:
    latest = checkpointer.latest_step()
  return latest is not None and latest >= num_steps


class _Results:
  """results.json, rewritten atomically after every part of the job."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, RESULTS)
    self.values: dict[str, Any] = {}
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.values = json.load(f)
    self.values.setdefault("seconds", {})

  def add_time(self, part: str, seconds: float) -> None:
    self.values["seconds"][part] = self.values["seconds"].get(part, 0.0) + seconds

  def write(self, **values) -> None:
    self.values.update(values)
    self.values["seconds"]["total"] = sum(
        v for k, v in self.values["seconds"].items() if k != "total")
    if _is_primary():
      with files.atomic_write(self.path) as f:
        json.dump(self.values, f, indent=2, sort_keys=True)


def _is_primary() -> bool:
  import jax
  return jax.process_index() == 0


def _sample(config, workdir: str, out: str) -> None:
  """Writes W/samples; a rerun after a crash continues from the batches
  already sampled (one process) or starts the samples again."""
  partial = out + ".partial"
  if _is_primary() and not os.path.isdir(os.path.join(partial, sample_job.BATCHES)):
    shutil.rmtree(partial, ignore_errors=True)
  settings = config.sample
  # Passed in full: a stage trained before its config carried the sampler
  # would otherwise fall back to its own.
  sample_job.run(
      os.path.join(workdir, "ldm"), partial, num_samples=settings.num_samples,
      sampler=settings.sampler, steps=settings.steps, guidance=settings.guidance,
      clip_x0=settings.clip_x0 or sample_job.NO_CLIP, autoguidance=settings.autoguidance,
      guide_step=settings.guide_step, seed=settings.seed,
      batch_size=settings.batch_size, use_ema=settings.use_ema)
  if _is_primary():
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)


def _fid(config, workdir: str, samples_dir: str) -> dict[str, float]:
  from ldm_jax import fid as fid_lib
  from ldm_jax.fid import reference as reference_lib
  model = reference_lib.cached_model(config.fid.weights)
  if config.fid.reference is not None:
    mu_ref, sigma_ref, _ = fid_lib.load_statistics(config.fid.reference)
  else:
    mu_ref, sigma_ref = fid_lib.reference_statistics(config.data, "train", model=model)
  batch = config.fid.batch_size
  out = {}
  counts = sorted(config.fid.sample_counts)
  if counts:
    with np.load(os.path.join(samples_dir, "samples.npz")) as saved:
      generated = saved["images"]
    features = model.features(generated[:counts[-1]], batch_size=batch, progress=False)
    for count in counts:
      mu, sigma = fid_lib.feature_statistics(features[:count])
      out[fid_key(count)] = fid_lib.frechet_distance(mu, sigma, mu_ref, sigma_ref)
  count = config.fid.vae_reconstructions
  if count:
    vae_workdir = os.path.join(workdir, "vae")
    saved, graphdef, state = runs.load_run(vae_workdir)
    vae_config = ml_collections.ConfigDict(saved)
    vae_config.data = config.data
    mesh = parallel.make_mesh()
    batches = (parallel.shard_batch(mesh, b) for b in data.eval_batches(
        vae_config.data, vae_config.eval.batch_size, num_examples=count))
    reconstructions = runs.make_stage(vae_config).fid_images(graphdef, state, batches, count)
    mu, sigma = model.statistics(reconstructions, batch_size=batch, progress=False)
    out["vae_r" + fid_key(len(reconstructions))] = fid_lib.frechet_distance(
        mu, sigma, mu_ref, sigma_ref)
  return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the whole job in `workdir`; returns results.json's content."""
  validate(config, workdir)
  data.ensure_prepared(config.data)  # Says how to prepare it by hand if it cannot.
  os.makedirs(workdir, exist_ok=True)
  results = _Results(workdir)
  for name, stage_workdir, stage_config in stage_configs(config, workdir):
    if _stage_finished(stage_workdir, stage_config.train.num_steps):
      logging.warning("stage %s: finished earlier in %s, not retrained", name, stage_workdir)
      continue
    start = time.perf_counter()
    train_loop.train_and_evaluate(stage_config, stage_workdir)
    results.add_time(name, time.perf_counter() - start)
    # Samples and figures of an earlier, shorter run describe another model.
    if _is_primary():
      shutil.rmtree(os.path.join(workdir, "samples"), ignore_errors=True)
    results.write(complete=False)
    if not _stage_finished(stage_workdir, stage_config.train.num_steps):
      return results.values  # Pre-empted: a rerun continues from here.

  samples_dir = os.path.join(workdir, "samples")
  if not os.path.exists(os.path.join(samples_dir, "samples.npz")):
    start = time.perf_counter()
    _sample(config, workdir, samples_dir)
    results.add_time("sample", time.perf_counter() - start)
    settings = config.sample
    results.write(num_samples=settings.num_samples, sampler=settings.sampler,
                  sampler_steps=settings.steps, guidance=settings.guidance,
                  clip_x0=settings.clip_x0, autoguidance=settings.autoguidance,
                  guide_step=settings.guide_step, ema=settings.use_ema)

  wanted = [fid_key(c) for c in config.fid.sample_counts]
  if config.fid.vae_reconstructions:
    wanted.append("vae_r" + fid_key(config.fid.vae_reconstructions))
  if results.values.get("complete") and all(k in results.values for k in wanted):
    return results.values
  start = time.perf_counter()
  figures = _fid(config, workdir, samples_dir)
  results.add_time("fid", time.perf_counter() - start)
  results.write(**figures, fid_reference=config.fid.reference or "cached train statistics",
                complete=True)
  return results.values


def summary(results: dict[str, Any]) -> str:
  """The lines a person reads at the end of the job."""
  if not results.get("complete"):
    return "the main job stopped before the end; rerun the same command to continue"
  figures = ", ".join(f"{k}={v:.2f}" for k, v in sorted(results.items())
                      if k.startswith(("fid_", "vae_rfid_")) and isinstance(v, float))
  seconds = results["seconds"]
  times = ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items())
  guide = ""
  if results.get("guide_step") is not None:
    guide = f", autoguidance {results['autoguidance']} by step {results['guide_step']}"
  return (f"{figures} ({results['num_samples']} samples, {results['sampler']}-"
          f"{results['sampler_steps']}, w={results['guidance']}{guide}); {times}")
