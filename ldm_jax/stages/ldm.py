"""Stage "ldm": class-conditional diffusion in the latent space of a frozen VAE.

The VAE rides along in the train state's `frozen` part: it is restored once
from its own workdir, encodes each augmented batch on the device, and is saved
with every LDM checkpoint, so an LDM workdir alone is enough to sample from.
Latents are multiplied by `latent_scale` (1 / their std, measured on training
batches at the start) so that diffusion sees unit-variance data, as the noise
schedule assumes.

With `ldm.cache_latents`, the VAE encodes every train image once per start,
as stored and mirrored, and each step looks its batch's posteriors up on the
host instead of running the encoder. The posterior is still sampled afresh
at every step with the same key, so training sees the same distribution (and
the same numbers, to float rounding) as without the cache. Only flips can be
cached: crops would need a posterior per offset.
"""

from __future__ import annotations

import dataclasses

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tqdm import tqdm

from ldm_jax import data, diffusion, ema, images, models, parallel, sampling
from ldm_jax.stages import base
from ldm_jax.stages import vae as vae_stage

# (vae_workdir, step or None) -> (config dict, VAE graphdef, train state).
VAELoader = Callable[[str, int | None], tuple[dict, nnx.GraphDef, Any]]


def check_latent_cache(config) -> None:
  """Refuses `ldm.cache_latents` where a cache cannot stand for the stream."""
  if config.ldm.get("cache_latents") and config.data.crop_padding:
    raise ValueError(
        "ldm.cache_latents caches flips only, but data.crop_padding="
        f"{config.data.crop_padding} crops too: set data.crop_padding=0 or "
        "ldm.cache_latents=False")


class LDMStage(base.Stage):
  picture_name = "samples.png"

  def __init__(self, config, load_vae: VAELoader | None = None):
    super().__init__(config)
    self._load_vae = load_vae
    check_latent_cache(config)
    # (2, N, *latent_shape[:-1], 2 * latent channels): the posterior mean and
    # log-variance of train image n as stored (0) and mirrored (1).
    self._posteriors: np.ndarray | None = None
    if config.ldm.denoiser not in models.DENOISERS:
      raise ValueError(f"unknown denoiser {config.ldm.denoiser!r}; choose from "
                       f"{', '.join(sorted(models.DENOISERS))}")
    if "vae" not in config:
      raise ValueError("the LDM config has no `vae` section: set --config.vae_checkpoint "
                       "to a VAE workdir so its architecture can be read from there")
    self.vae_graphdef, abstract_vae = _abstract_vae(config)
    self.latent_shape = tuple(abstract_vae.latent_shape)
    self.schedule = diffusion.make_schedule(
        config.diffusion.schedule, config.diffusion.num_timesteps,
        config.diffusion.beta_start, config.diffusion.beta_end)
    self.num_classes = config.data.num_classes

  @property
  def ema_schedule(self) -> ema.DecaySchedule:
    settings = self.config.ldm.ema
    return ema.decay_schedule(
        settings.schedule, batch_size=self.config.train.batch_size, decay=settings.decay,
        halflife_images=settings.halflife_images, rampup_ratio=settings.rampup_ratio,
        power_std=settings.power_std)

  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    name = self.config.ldm.denoiser
    return models.make_denoiser(name, latent_shape=self.latent_shape,
                                num_classes=self.num_classes, rngs=rngs,
                                dtype=_compute_dtype(self.config), **self.config[name].to_dict())

  def init_frozen(self, batches: Iterator[dict] | None) -> Any:
    if batches is None:
      _, abstract_vae = _abstract_vae(self.config)
      _, params, rest = nnx.split(abstract_vae, nnx.Param, ...)
      return dict(vae=dict(params=params, rest=rest),
                  latent_scale=jax.ShapeDtypeStruct((), jnp.float32))
    if self._load_vae is None or not self.config.get("vae_checkpoint"):
      raise ValueError("set --config.vae_checkpoint to the workdir of a trained VAE")
    _, _, vae_state = self._load_vae(self.config.vae_checkpoint, self.config.get("vae_step"))
    # An adversarial VAE run also holds its critic, which the LDM never uses.
    vae = dict(params=vae_stage.autoencoder_state(vae_state.eval_params()),
               rest=vae_stage.autoencoder_state(vae_state.rest))
    return dict(vae=vae, latent_scale=self._measure_latent_scale(vae, batches))

  def _measure_latent_scale(self, vae: dict, batches: Iterator[dict]) -> jax.Array:
    """1 / std of posterior samples over a few training batches."""
    encode = jax.jit(lambda vae, x, rng: self._encode(dict(vae=vae, latent_scale=1.0), x, rng))
    samples = []
    for index, batch in zip(range(self.config.ldm.scale_batches), batches):
      samples.append(encode(vae, batch["image"], jax.random.PRNGKey(index)))
    std = float(jnp.std(jnp.stack(samples)))
    if not np.isfinite(std) or std <= 0:
      raise ValueError(f"the VAE's latents have std {std}: is the checkpoint sound?")
    return jnp.float32(1.0 / std)

  def _posterior(self, vae: dict, x: jax.Array) -> jax.Array:
    """The VAE posterior's mean and log-variance, concatenated on the last axis."""
    mean, logvar = nnx.merge(self.vae_graphdef, vae["params"], vae["rest"]).encode(x)
    return jnp.concatenate([mean, logvar], axis=-1)

  def _sample_latent(self, frozen: Any, posterior: jax.Array, rng: jax.Array) -> jax.Array:
    mean, logvar = jnp.split(posterior, 2, axis=-1)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return jax.lax.stop_gradient(z * frozen["latent_scale"])

  def _encode(self, frozen: Any, x: jax.Array, rng: jax.Array) -> jax.Array:
    return self._sample_latent(frozen, self._posterior(frozen["vae"], x), rng)

  def posteriors(self, vae: dict, images_uint8: np.ndarray, mesh, progress=None) -> np.ndarray:
    """The posterior (mean and log-variance, concatenated) of each uint8 image."""
    # The stream's [-1, 1] conversion (augment.to_signed_unit_range), done on
    # the devices so that a whole split never exists as float32 on the host.
    encode = jax.jit(lambda vae, x: self._posterior(vae, x.astype(jnp.float32) / 127.5 - 1.0))
    return parallel.map_in_batches(lambda x: encode(vae, x), images_uint8,
                                   self.config.eval.batch_size, mesh, progress=progress)

  def prepare_training(self, frozen, mesh):
    if not self.config.ldm.get("cache_latents"):
      return
    stored, _ = data.load_split_images(self.config.data, "train")
    with tqdm(total=2 * len(stored), unit="img", desc="caching latents", leave=False,
              disable=not self.config.train.progress_bar or jax.process_index() != 0) as bar:
      self._posteriors = np.stack([
          self.posteriors(frozen["vae"], orientation, mesh, progress=bar.update)
          for orientation in (stored, stored[:, :, ::-1])])

  def train_batch(self, batch):
    if self._posteriors is None:
      return batch
    return dict(posterior=self._posteriors[batch["flip"], batch["index"]],
                label=batch["label"])

  def _per_example_loss(self, model, frozen, batch, rng, class_dropout):
    encode_rng, dropout_rng, diffusion_rng = jax.random.split(rng, 3)
    if "posterior" in batch:  # Looked up from the latent cache.
      z = self._sample_latent(frozen, batch["posterior"], encode_rng)
    else:
      z = self._encode(frozen, batch["image"], encode_rng)
    labels = batch["label"]
    if class_dropout > 0:
      drop = jax.random.bernoulli(dropout_rng, class_dropout, labels.shape)
      labels = jnp.where(drop, self.num_classes, labels)
    settings = self.config.diffusion
    return diffusion.diffusion_loss(
        self.schedule, lambda z_t, t: model(z_t, t, labels), z, diffusion_rng,
        settings.prediction, weighting=settings.loss_weighting,
        min_snr_gamma=settings.min_snr_gamma, timestep_sampling=settings.timestep_sampling,
        lognormal_mean=settings.lognormal_mean, lognormal_std=settings.lognormal_std)

  def loss(self, model, frozen, batch, rng):
    per_example = self._per_example_loss(model, frozen, batch, rng, self.config.ldm.class_dropout)
    return jnp.mean(per_example), {}

  def eval_metrics(self, model, frozen, batch, rng):
    return dict(loss=self._per_example_loss(model, frozen, batch, rng, class_dropout=0.0))

  def decoder(self, graphdef: nnx.GraphDef) -> sampling.LatentDecoder:
    if getattr(self, "_decoder", None) is None or self._decoder.denoiser_graphdef is not graphdef:
      self._decoder = sampling.LatentDecoder(
          denoiser_graphdef=graphdef, vae_graphdef=self.vae_graphdef, schedule=self.schedule,
          latent_shape=self.latent_shape, num_classes=self.num_classes,
          prediction=self.config.diffusion.prediction)
    return self._decoder

  def _eval_sampler(self) -> sampling.SamplerSettings:
    # Pictures and FID during training use classifier-free guidance alone:
    # the guide checkpoint of autoguidance may not exist yet.
    return dataclasses.replace(sampling.run_settings(self.config.eval), autoguidance=1.0,
                               guide_step=None)

  def _generate(self, graphdef, state, labels, batch_size):
    mesh = parallel.make_mesh()
    batch_size = -(-batch_size // mesh.devices.size) * mesh.devices.size
    return sampling.generate(
        self.decoder(graphdef), self._eval_sampler(), state.eval_params(), state.rest,
        state.frozen, labels, seed=self.config.seed, batch_size=batch_size, mesh=mesh)

  def picture(self, graphdef, state, batch):
    del batch
    classes = range(min(self.config.eval.picture_classes, self.num_classes))
    per_class = self.config.eval.picture_examples
    labels = sampling.rows_for_classes(classes, per_class)
    samples = self._generate(graphdef, state, labels, len(labels))
    names = data.class_names(self.config.data)
    return images.labelled_rows(
        [samples[i * per_class:(i + 1) * per_class] for i in classes],
        [names[c] for c in classes])

  def fid_images(self, graphdef, state, batches, num_images):
    del batches
    labels = sampling.balanced_labels(num_images, self.num_classes)
    return self._generate(graphdef, state, labels, self.config.eval.batch_size)


def _compute_dtype(config) -> str:
  # Runs saved before mixed precision existed have no key: they were float32.
  return config.train.get("compute_dtype", "float32")


def _abstract_vae(config):
  # The frozen VAE computes in the run's dtype too; its weights stay float32.
  abstract = nnx.eval_shape(lambda: models.VAE(**config.vae.model, dtype=_compute_dtype(config),
                                               rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract)
  return graphdef, abstract
