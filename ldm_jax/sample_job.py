"""Samples a trained LDM workdir into the files a user looks at, and scores them.

What `sample.py` writes, as a function, so that the main job (ldm_jax.pipeline)
writes the very same files:
  generated_samples/   one PNG per image, named <index>_<class name>.png
  grid_samples.png     one row per class shown, its name at the left
  comparison.png       test images (top) above their VAE reconstructions
  samples.npz          images (uint8 NHWC) and labels, the input of python -m ldm_jax.fid

A job that is stopped while sampling continues from its finished batches
when it is run again with the same output folder (one process).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Sequence

import numpy as np

OUTPUTS = ("generated_samples", "grid_samples.png", "comparison.png", "samples.npz")
# While sampling, finished batches wait here, so that a killed job rerun with
# the same --out continues; removed once OUTPUTS are written.
BATCHES = "batches"
NO_CLIP = 0.0  # clip_x0 that turns clipping off even where the run's sampler clips.


def parse_classes(values: Sequence[str] | None, names: Sequence[str]) -> list[int]:
  """Class ids from ids or names; a clear error for anything else."""
  if not values:
    return list(range(len(names)))
  index = {name: i for i, name in enumerate(names)}
  classes = []
  for value in values:
    value = value.strip()
    if value.lstrip("-").isdigit():
      class_id = int(value)
      if not 0 <= class_id < len(names):
        raise ValueError(f"class id {class_id} is out of range 0..{len(names) - 1}")
    elif value in index:
      class_id = index[value]
    else:
      raise ValueError(f"unknown class {value!r}; names are e.g. {', '.join(names[:5])}, ...")
    classes.append(class_id)
  return classes


def check_out_dir(out: str) -> None:
  if os.path.isdir(os.path.join(out, BATCHES)):
    return  # A stopped job's folder: it is continued, its partial outputs rewritten.
  clash = [name for name in OUTPUTS if os.path.exists(os.path.join(out, name))]
  if clash:
    raise FileExistsError(f"{out} already holds {', '.join(clash)}; "
                          "pick a new --out so nothing is overwritten")


def run(workdir: str, out: str, *, num_samples: int, sampler: str | None = None,
        steps: int | None = None, guidance: float | None = None,
        classes: Sequence[str] | None = None, seed: int = 0, batch_size: int = 256,
        eta: float = 0.0, clip_x0: float | None = None, step: int | None = None,
        use_ema: bool = True, autoguidance: float | None = None,
        guide_step: int | None = None,
        grid_per_class: int = 10, grid_classes: int = 10, fid: bool = False,
        fid_weights: str | None = None, fid_reference: str | None = None,
        data_dir: str | None = None) -> dict:
  """Writes OUTPUTS under `out` and returns {num_samples, sampler, FID-<n> if `fid`}.

  sampler, steps, guidance, clip_x0, autoguidance and guide_step default to
  the run's own sampler (sampling.run_settings); clip_x0=NO_CLIP and
  autoguidance=1 turn clipping and autoguidance off. The guide is checkpoint
  `guide_step` of the same run, with the EMA parameters if `use_ema`.
  """
  import jax
  import ml_collections
  from ldm_jax import data, files, images, parallel, runs, sampling

  # Everything that can be wrong is checked before any sampling starts.
  if num_samples < 1:
    raise ValueError(f"--num_samples must be positive, got {num_samples}")
  check_out_dir(out)
  saved = runs.load_config(workdir, step)
  if saved.get("stage") != "ldm":
    raise ValueError(f"{workdir} is a {saved.get('stage')!r} run; sample.py needs an LDM run")
  config = ml_collections.ConfigDict(saved)
  settings = sampling.run_settings(config.eval, sampler=sampler, steps=steps,
                                   guidance=guidance, clip_x0=clip_x0, eta=eta,
                                   autoguidance=autoguidance, guide_step=guide_step)
  if settings.guide_step is not None:
    runs.load_config(workdir, settings.guide_step)  # Fails early if the guide is missing.
  if data_dir is not None:
    config.data.data_dir = data_dir
  data.ensure_prepared(config.data)
  names = data.class_names(config.data)
  class_ids = parse_classes(classes, names)

  mesh = parallel.make_mesh()
  batch_size = -(-batch_size // mesh.devices.size) * mesh.devices.size
  _, graphdef, state = runs.load_run(workdir, step, mesh)
  stage = runs.make_stage(config)
  params = state.eval_params() if use_ema else state.params
  guide_params = None
  if settings.guide_step is not None:
    guide_params = runs.load_params(workdir, settings.guide_step, mesh, ema=use_ema)

  labels = np.asarray(class_ids, np.int32)[np.arange(num_samples) % len(class_ids)]
  resume_dir = None
  if jax.process_count() == 1:
    # The path names the weights; generate() checks everything else.
    resume_dir = os.path.join(out, BATCHES, f"step{int(state.step)}-{'ema' if use_ema else 'params'}")
  generated = sampling.generate(stage.decoder(graphdef), settings, params, state.rest,
                                state.frozen, labels, seed=seed, batch_size=batch_size,
                                mesh=mesh, progress=True, resume_dir=resume_dir,
                                guide_params=guide_params)

  samples_dir = os.path.join(out, "generated_samples")
  os.makedirs(samples_dir, exist_ok=True)
  for index, (image, label) in enumerate(zip(generated, labels)):
    images.save_png(os.path.join(samples_dir, f"{index:05d}_{names[label]}.png"), image)

  shown = list(dict.fromkeys(class_ids))[:grid_classes]
  rows = [generated[labels == c][:grid_per_class] for c in shown]
  images.save_png(os.path.join(out, "grid_samples.png"),
                  images.labelled_rows(rows, [names[c] for c in shown]))

  count = -(-grid_per_class // mesh.devices.size) * mesh.devices.size
  test = next(iter(data.eval_batches(config.data, count, num_examples=count)))
  originals = test["image"][:grid_per_class]
  from ldm_jax.stages import vae as vae_stage
  reconstructions = vae_stage.reconstruct(
      stage.vae_graphdef, state.frozen["vae"]["params"], state.frozen["vae"]["rest"],
      jax.numpy.asarray(originals))
  images.save_png(os.path.join(out, "comparison.png"), images.comparison(
      images.to_uint8(originals), images.to_uint8(np.asarray(reconstructions))))
  with files.atomic_write(os.path.join(out, "samples.npz"), "wb") as f:
    np.savez(f, images=generated, labels=labels)
  if resume_dir is not None:
    shutil.rmtree(os.path.join(out, BATCHES))

  result = {"num_samples": len(generated), "sampler": dataclasses.asdict(settings)}
  if fid:
    from ldm_jax import fid as fid_lib
    result[fid_lib.fid_name(len(generated))] = fid_lib.fid_against_reference(
        generated, config.data, weights=fid_weights, reference=fid_reference)
  return result


