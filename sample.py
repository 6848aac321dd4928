"""Samples images from a trained LDM workdir, and optionally scores their FID.

  python sample.py --workdir=runs/ldm --out=out --num_samples=512 \
      [--sampler=dpm_solver --steps=20 --guidance=2.0 --clip_x0=3] [--classes=3,17,apple] [--fid]
      [--autoguidance=2 --guide_step=700]

The sampler flags default to the run's own sampler, the `eval` section of its
config (sampler, sample_steps, guidance, clip_x0, autoguidance, guide_step): for the main job's W/ldm,
the settings its samples and FID were made with (for configs/cifar100_cpu.py,
dpm_solver-10, w=5, autoguidance 2 by the run's step 700, clip 3, chosen by
the tables in docs/results.md).

Writes, under --out:
  generated_samples/   one PNG per image, named <index>_<class name>.png
  grid_samples.png     one row per class shown, its name at the left
  comparison.png       test images (top) above their VAE reconstructions
  samples.npz          images (uint8 NHWC) and labels, the input of python -m ldm_jax.fid

Finished batches wait in --out/batches/ until the end: a run that is stopped
while sampling continues from them when it is started again with the same
--out and settings (settings that differ are refused).
"""

from __future__ import annotations

from absl import app, flags, logging

from ldm_jax import cli
from ldm_jax.sample_job import NO_CLIP, OUTPUTS, check_out_dir, parse_classes, run  # noqa: F401

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of an LDM run.")
_OUT = flags.DEFINE_string("out", None, "Output folder (must be new or empty).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 512, "How many images.")
_RUNS_OWN = " (default: the run's own, eval.{} of its config)"
_SAMPLER = flags.DEFINE_string(
    "sampler", None,
    "ddpm | ddim | dpm_solver (DPM-Solver++(2M): ddim-50's FID in 20 steps, docs/results.md)"
    + _RUNS_OWN.format("sampler"))
_STEPS = flags.DEFINE_integer("steps", None, "Sampler steps (ddpm always takes all T)"
                              + _RUNS_OWN.format("sample_steps"))
_ETA = flags.DEFINE_float("eta", 0.0, "DDIM noise: 0 deterministic, 1 DDPM-like.")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance weight w"
                               + _RUNS_OWN.format("guidance"))
_CLIP_X0 = flags.DEFINE_float("clip_x0", None, "Clip every x0 estimate of the sampler to "
                              "[-C, C] in unit-std latent units; 0: no clipping"
                              + _RUNS_OWN.format("clip_x0"))
_AUTOGUIDANCE = flags.DEFINE_float(
    "autoguidance", None, "Weight of the autoguidance term (1: off), guided by checkpoint "
    "--guide_step of the same run" + _RUNS_OWN.format("autoguidance"))
_GUIDE_STEP = flags.DEFINE_integer("guide_step", None, "Checkpoint step whose model guides"
                                   + _RUNS_OWN.format("guide_step"))
_CLASSES = flags.DEFINE_list("classes", None,
                             "Class ids or names to sample (default: all, balanced).")
_SEED = flags.DEFINE_integer("seed", 0, "Same seed, same images, on any device count.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Images per compiled sampling call.")
_USE_EMA = flags.DEFINE_bool("ema", True, "Sample with the EMA parameters.")
_GRID_PER_CLASS = flags.DEFINE_integer("grid_per_class", 10, "Images per row of the grid.")
_GRID_CLASSES = flags.DEFINE_integer("grid_classes", 10, "Rows of the grid at most.")
_FID = flags.DEFINE_bool("fid", False, "Also compute FID against the train statistics.")
_FID_WEIGHTS = flags.DEFINE_string("fid_weights", None, "Inception weights for --fid.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (default: the run's).")
_FID_REFERENCE = flags.DEFINE_string(
    "fid_reference", None,
    "Statistics .npz to score against (default: the cached train statistics, computed once).")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  cli.require_directory("--workdir", _WORKDIR.value)
  cli.require_directory("--out", _OUT.value)
  result = run(
      _WORKDIR.value, _OUT.value, num_samples=_NUM_SAMPLES.value, sampler=_SAMPLER.value,
      steps=_STEPS.value, guidance=_GUIDANCE.value, classes=_CLASSES.value, seed=_SEED.value,
      batch_size=_BATCH_SIZE.value, eta=_ETA.value, clip_x0=_CLIP_X0.value, step=_STEP.value,
      use_ema=_USE_EMA.value, autoguidance=_AUTOGUIDANCE.value, guide_step=_GUIDE_STEP.value,
      grid_per_class=_GRID_PER_CLASS.value, grid_classes=_GRID_CLASSES.value, fid=_FID.value,
      fid_weights=_FID_WEIGHTS.value, fid_reference=_FID_REFERENCE.value,
      data_dir=_DATA_DIR.value)
  used = result["sampler"]
  guide = ("" if used["guide_step"] is None
           else f", autoguidance {used['autoguidance']} by step {used['guide_step']}")
  print(f"wrote {result['num_samples']} samples to {_OUT.value} ({used['sampler']}, "
        f"{used['num_steps']} steps, guidance {used['guidance']}, clip_x0 {used['clip_x0']}"
        f"{guide})")
  for key, value in result.items():
    if key.startswith("FID"):
      print(f"{key} (against the train statistics): {value:.3f}")


if __name__ == "__main__":
  cli.run(main)  # Errors: one line and exit status 2 (traceback: --debug).
