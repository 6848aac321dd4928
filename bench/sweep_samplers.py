"""Sample quality and speed of each sampler and guidance weight on a trained LDM.

  python bench/sweep_samplers.py --workdir=runs/cpu/ldm --num_samples=2000 \
      --reference=../shared/data/fid/cifar100_train_stats.npz \
      --settings=ddpm-1000@2,ddim-50@2,dpm_solver-10@2,dpm_solver-20@2 \
      --settings=dpm_solver-20@0,dpm_solver-20@1,dpm_solver-20@3,dpm_solver-20@5

Each setting is SAMPLER-STEPS@GUIDANCE, optionally /clipC to clip every x0
estimate to [-C, C] (e.g. dpm_solver-20@2/clip3), /autoA@S for
autoguidance of weight A by the run's checkpoint S (e.g.
dpm_solver-10@5/clip3/auto2@700), and /etaE for DDIM's noise (e.g.
ddim-50@5/clip3/eta1; 0, deterministic, unless given), in that order
(`sampling.parse_setting`). The same class-balanced labels and seed are
used for every setting; images/s counts sampling and decoding only,
after a first batch that compiles (not timed; with --nowarmup, compiling is
counted too). Prints one markdown table row per setting, with FID-N against
the reference statistics. With --resume_dir, each finished batch is kept, and
a stopped sweep continues where it was (ddpm-1000 at 2,000 images takes about
2.5 h on 2 CPU cores).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections
from absl import app, flags, logging

from ldm_jax import fid as fid_lib
from ldm_jax import huge_pages, parallel, runs, sampling
from ldm_jax.fid import reference as reference_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "LDM workdir.")
_REFERENCE = flags.DEFINE_string("reference", None, "Reference statistics .npz.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 2000, "Samples per setting.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 250, "Images per sampling call.")
_SETTINGS = flags.DEFINE_multi_string("settings", [], "SAMPLER-STEPS@GUIDANCE, comma-separated.")
_EMA = flags.DEFINE_bool("ema", True, "Sample with the EMA parameters.")
_WARMUP = flags.DEFINE_bool(
    "warmup", True, "Compile on one untimed batch first. --nowarmup for ddpm-1000, where that "
    "batch alone takes about 18 min on 2 CPU cores and compiling is a small share.")
_RESUME_DIR = flags.DEFINE_string(
    "resume_dir", None, "Save each finished batch under DIR/<setting>/ and reuse the ones "
    "there, so a long setting can be stopped and continued; images/s then counts only the "
    "batches sampled by this call.")
flags.mark_flags_as_required(["workdir", "reference"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  texts = [s for group in _SETTINGS.value for s in group.split(",") if s]
  settings = [sampling.parse_setting(s) for s in texts]
  mesh = parallel.make_mesh()
  saved, graphdef, state = runs.load_run(_WORKDIR.value, mesh=mesh)
  stage = runs.make_stage(ml_collections.ConfigDict(saved))
  params = state.eval_params() if _EMA.value else state.params
  step = int(state.step)
  labels = sampling.balanced_labels(_NUM_SAMPLES.value, stage.num_classes)
  model = reference_lib.cached_model()
  mu_ref, sigma_ref, _ = fid_lib.load_statistics(_REFERENCE.value)
  batch = _BATCH_SIZE.value
  print(f"| sampler | steps | eta | w | clip x0 | autoguidance | FID-{_NUM_SAMPLES.value} "
        "| images/s |")
  print("|---|---|---|---|---|---|---|---|")
  for text, setting in zip(texts, settings):
    decoder = stage.decoder(graphdef)
    guide_params = None
    if setting.guide_step is not None:
      guide_params = runs.load_params(_WORKDIR.value, setting.guide_step, mesh, ema=_EMA.value)
    resume_dir = None
    if _RESUME_DIR.value:
      # The weights are part of what made the batches: the path names the run and step.
      resume_dir = os.path.join(_RESUME_DIR.value, f"{text.replace('/', '_')}-ema{int(_EMA.value)}-step{step}")
      done = sampling.count_saved_batches(resume_dir)
    else:
      done = 0
    if _WARMUP.value:  # Compile (and warm) on one batch, then time the whole set.
      sampling.generate(decoder, setting, params, state.rest, state.frozen, labels[:batch],
                        seed=1, batch_size=batch, mesh=mesh, guide_params=guide_params)
    start = time.perf_counter()
    images = sampling.generate(decoder, setting, params, state.rest, state.frozen, labels,
                               seed=0, batch_size=batch, mesh=mesh, resume_dir=resume_dir,
                               guide_params=guide_params)
    sampled = len(images) - min(len(images), done * batch)
    speed = sampled / (time.perf_counter() - start) if sampled else float("nan")
    mu, sigma = model.statistics(images, progress=False)
    value = fid_lib.frechet_distance(mu, sigma, mu_ref, sigma_ref)
    steps = 1000 if setting.sampler == "ddpm" else setting.num_steps
    clip = "-" if setting.clip_x0 is None else f"{setting.clip_x0:g}"
    auto = ("-" if setting.guide_step is None
            else f"{setting.autoguidance:g} by step {setting.guide_step}")
    print(f"| {setting.sampler} | {steps} | {setting.eta:g} | {setting.guidance:g} | {clip} "
          f"| {auto} | {value:.1f} | {speed:.1f} |",
          flush=True)


if __name__ == "__main__":
  huge_pages.reexec_with_huge_pages()  # Time what train.py gets.
  app.run(main)
