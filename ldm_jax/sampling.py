"""From class labels to decoded images: guided latent sampling, then the VAE.

Used by the LDM stage (pictures and FID during training) and by sample.py.
Each batch of samples is one compiled program, sharded over the `data` axis.
The noise is drawn inside it from one key and the global shape, which makes
the samples independent of how many devices share the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from ldm_jax import diffusion, files, images, parallel


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  sampler: str = "ddim"
  num_steps: int | None = 50  # Ignored by 'ddpm', which takes every step.
  guidance: float = 2.0  # 1 = plain conditional, 0 = unconditional.
  eta: float = 0.0
  # Clip every x0 estimate to [-clip_x0, clip_x0] (latents are scaled to unit
  # std). An undertrained eps network's x0 estimate near t = T is its small
  # eps error divided by alpha_T = 0.006; deterministic samplers lock that
  # in (latents 7x too large, saturated images) unless it is clipped.
  clip_x0: float | None = None
  # Autoguidance (diffusion.guided_model_fn): the weight of the guide term
  # (1: off) and the checkpoint step of the same run whose parameters guide.
  autoguidance: float = 1.0
  guide_step: int | None = None

  def __post_init__(self):
    if self.sampler not in diffusion.SAMPLERS:
      raise ValueError(f"unknown sampler {self.sampler!r}; choose from "
                       f"{', '.join(sorted(diffusion.SAMPLERS))}")
    if self.sampler != "ddpm" and (self.num_steps is None or self.num_steps < 1):
      raise ValueError(f"{self.sampler} needs a positive number of steps, got {self.num_steps}")
    if self.eta != 0.0 and self.sampler != "ddim":
      raise ValueError(f"eta applies to the ddim sampler only, not {self.sampler}")
    if self.eta < 0:
      raise ValueError(f"eta must be >= 0, got {self.eta}")
    if self.clip_x0 is not None and not self.clip_x0 > 0:
      raise ValueError(f"clip_x0 must be positive or None, got {self.clip_x0}")
    if self.guidance < 0:
      raise ValueError(f"guidance must be >= 0, got {self.guidance}")
    if self.autoguidance < 1:
      raise ValueError(f"autoguidance must be >= 1 (1: off), got {self.autoguidance}")
    if (self.autoguidance != 1) != (self.guide_step is not None):
      raise ValueError("autoguidance != 1 needs a guide_step and guide_step needs "
                       f"autoguidance != 1; got {self.autoguidance} and {self.guide_step}")
    if self.guide_step is not None and self.guide_step < 0:
      raise ValueError(f"guide_step must be >= 0, got {self.guide_step}")


def parse_setting(text: str) -> SamplerSettings:
  """Settings from their short text form, as the sampler sweep takes them:
  SAMPLER-STEPS@GUIDANCE, then optionally and in this order /clipC (x0
  clipped to [-C, C]), /autoA@S (autoguidance of weight A by checkpoint S)
  and /etaE (DDIM's noise), e.g. "dpm_solver-10@5/clip3/auto2@700" or
  "ddim-50@5/eta1". SamplerSettings checks the values."""
  rest, _, eta = text.partition("/eta")
  rest, _, auto = rest.partition("/auto")
  rest, _, clip = rest.partition("/clip")
  if "/" in eta + auto + clip or rest.count("@") != 1:
    raise ValueError(f"sampler setting {text!r} is not SAMPLER-STEPS@GUIDANCE followed by "
                     "/clipC, /autoA@S and /etaE in that order")
  sampler_steps, guidance = rest.split("@")
  sampler, steps = sampler_steps.rsplit("-", 1)
  weight, guide_step = auto.split("@") if auto else ("1", None)
  return SamplerSettings(sampler=sampler, num_steps=int(steps), guidance=float(guidance),
                         eta=float(eta or 0), clip_x0=float(clip) if clip else None,
                         autoguidance=float(weight),
                         guide_step=None if guide_step is None else int(guide_step))


def run_settings(eval_config, *, sampler: str | None = None, steps: int | None = None,
                 guidance: float | None = None, clip_x0: float | None = None,
                 eta: float = 0.0, autoguidance: float | None = None,
                 guide_step: int | None = None) -> SamplerSettings:
  """A run's own sampler, with any field given here in its place.

  A run's sampler is its config's `eval` section (sampler, sample_steps,
  guidance, clip_x0): its eval pictures use it, sample.py defaults to it, and
  the main job writes its `sample` settings there. clip_x0=0 turns clipping
  off; configs saved before eval.clip_x0 existed sample unclipped, and those
  saved before eval.autoguidance without it. autoguidance=1 turns it off.
  """
  if clip_x0 is None:
    clip_x0 = eval_config.get("clip_x0")
  if autoguidance is None:
    autoguidance = eval_config.get("autoguidance") or 1.0
  if guide_step is None and autoguidance != 1:
    guide_step = eval_config.get("guide_step")
  return SamplerSettings(
      sampler=eval_config["sampler"] if sampler is None else sampler,
      num_steps=eval_config["sample_steps"] if steps is None else steps,
      guidance=eval_config["guidance"] if guidance is None else guidance,
      eta=eta, clip_x0=clip_x0 or None, autoguidance=autoguidance,
      guide_step=guide_step)


@dataclasses.dataclass(frozen=True)
class LatentDecoder:
  """What turns a denoiser into images: its graph, the frozen VAE, the schedule."""
  denoiser_graphdef: nnx.GraphDef
  vae_graphdef: nnx.GraphDef
  schedule: diffusion.Schedule
  latent_shape: tuple[int, ...]
  num_classes: int
  prediction: str

  def __hash__(self):  # Used as a static jit argument; one per run is plenty.
    return id(self)

  def __eq__(self, other):
    return self is other


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sample_batch(decoder: LatentDecoder, settings: SamplerSettings, params, rest, frozen,
                  guide_params, labels: jax.Array, rng: jax.Array) -> jax.Array:
  denoiser = nnx.merge(decoder.denoiser_graphdef, params, rest)
  denoiser.eval()
  guide = None
  if guide_params is not None:
    guide = nnx.merge(decoder.denoiser_graphdef, guide_params, rest)
    guide.eval()
  vae = nnx.merge(decoder.vae_graphdef, frozen["vae"]["params"], frozen["vae"]["rest"])
  noise_rng, sampler_rng = jax.random.split(rng)
  z_T = jax.random.normal(noise_rng, labels.shape + decoder.latent_shape)
  model_fn = diffusion.guided_model_fn(denoiser, labels, decoder.num_classes, settings.guidance,
                                       guide_fn=guide, autoguidance=settings.autoguidance)
  z_0 = diffusion.sample(settings.sampler, model_fn, decoder.schedule, z_T, sampler_rng,
                         num_steps=settings.num_steps, eta=settings.eta,
                         prediction=decoder.prediction, clip_x0=settings.clip_x0)
  return vae.decode(z_0 / frozen["latent_scale"])


def generate(decoder: LatentDecoder, settings: SamplerSettings, params, rest, frozen,
             labels: np.ndarray, *, seed: int, batch_size: int, mesh: Mesh,
             progress: bool = False, resume_dir: str | None = None,
             guide_params=None) -> np.ndarray:
  """uint8 NHWC images, one per label, in the order of `labels`.

  Batch i uses key fold_in(seed, i) and the last batch is padded to the full
  size, so an image depends only on the seed, its index and `batch_size`.

  With `resume_dir`, every finished batch is saved there and batches already
  there are loaded instead of sampled, so a long job (ddpm-1000 over
  thousands of images on a CPU takes hours) can be stopped and continued.
  The directory records the settings, seed, batch size and labels, and a
  call with others is refused; which weights made the batches is the
  caller's to encode in the path. Single-process only.

  `guide_params` (the denoiser parameters of checkpoint `settings.guide_step`,
  with the same `rest`) is needed exactly when `settings.autoguidance` is
  not 1.
  """
  labels = np.asarray(labels, dtype=np.int32)
  if (guide_params is None) != (settings.autoguidance == 1):
    raise ValueError(f"autoguidance {settings.autoguidance} with guide parameters "
                     f"{'missing' if guide_params is None else 'given'}")
  parallel.check_batch_size(batch_size, mesh)
  if resume_dir is not None:
    if jax.process_count() > 1:
      # Every process must take the same sample-or-load decision for each
      # batch, and a saved batch is visible only where its filesystem is.
      raise ValueError("resume_dir works in a single process only")
    _claim_resume_dir(resume_dir, settings, labels, seed=seed, batch_size=batch_size)
  sharding = parallel.batch_sharding(mesh)
  key = jax.random.PRNGKey(seed)
  # The weights may sit on another device set (a checkpoint restored for a
  # different mesh); sampling runs where `mesh` says.
  params, rest, frozen, guide_params = parallel.replicate(
      mesh, (params, rest, frozen, guide_params))
  out = []
  starts = range(0, len(labels), batch_size)
  for index, start in enumerate(tqdm(starts, desc=f"sampling ({settings.sampler})",
                                     disable=not progress, unit="batch")):
    chunk = labels[start:start + batch_size]
    saved = None if resume_dir is None else _batch_path(resume_dir, index)
    if saved is not None and os.path.exists(saved):
      out.append(np.load(saved))
      continue
    padded = np.pad(chunk, (0, batch_size - len(chunk)), mode="edge")
    x = _sample_batch(decoder, settings, params, rest, frozen, guide_params,
                      jax.device_put(padded, sharding), jax.random.fold_in(key, index))
    out.append(images.to_uint8(parallel.gather_to_host(x))[:len(chunk)])
    if saved is not None:
      with files.atomic_write(saved, "wb") as f:
        np.save(f, out[-1])
  return np.concatenate(out) if out else np.zeros((0,), np.uint8)


def _claim_resume_dir(resume_dir: str, settings: SamplerSettings, labels: np.ndarray, *,
                      seed: int, batch_size: int) -> None:
  """Writes (or checks) what the batches in `resume_dir` were sampled with."""
  manifest = dict(settings=dataclasses.asdict(settings), seed=seed, batch_size=batch_size,
                  num_images=len(labels),
                  labels_sha256=hashlib.sha256(labels.tobytes()).hexdigest())
  path = os.path.join(resume_dir, "manifest.json")
  if os.path.exists(path):
    with open(path) as f:
      found = json.load(f)
    if found != manifest:
      raise ValueError(f"{resume_dir} holds batches of another sampling job ({found}); "
                       f"this one is {manifest}. Use a new directory.")
    return
  with files.atomic_write(path) as f:  # Creates resume_dir.
    json.dump(manifest, f, indent=1)


def _batch_path(resume_dir: str, index: int) -> str:
  return os.path.join(resume_dir, f"batch_{index:05d}.npy")


def count_saved_batches(resume_dir: str) -> int:
  """How many leading batches a resume_dir already holds."""
  count = 0
  while os.path.exists(_batch_path(resume_dir, count)):
    count += 1
  return count


def balanced_labels(num_images: int, num_classes: int) -> np.ndarray:
  """0, 1, ..., C-1, 0, 1, ...: every class equally often (FID protocol)."""
  return np.arange(num_images, dtype=np.int32) % num_classes


def rows_for_classes(classes: Iterator[int], per_class: int) -> np.ndarray:
  return np.repeat(np.asarray(list(classes), dtype=np.int32), per_class)
