"""Stage "vae": the autoencoder, trained on reconstruction + kl_weight * KL."""

from __future__ import annotations

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ldm_jax import images, parallel
from ldm_jax.models import vae as vae_lib
from ldm_jax.stages import base


@functools.partial(jax.jit, static_argnums=0)
def reconstruct(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State,
                x: jax.Array) -> jax.Array:
  """Decodes the posterior mean: the autoencoder's deterministic output."""
  model = nnx.merge(graphdef, params, rest)
  mean, _ = model.encode(x)
  return model.decode(mean)


class VAEStage(base.Stage):
  picture_name = "comparison.png"

  def build_model(self, rngs: nnx.Rngs) -> vae_lib.VAE:
    return vae_lib.VAE(**self.config.vae.model,
                       dtype=self.config.train.get("compute_dtype", "float32"), rngs=rngs)

  def _losses(self, model, batch, rng):
    x = batch["image"]
    x_hat, mean, logvar = model(x, rng)
    reconstruction = vae_lib.reconstruction_loss(x_hat, x, self.config.vae.reconstruction_loss)
    kl = vae_lib.gaussian_kl(mean, logvar)
    return reconstruction + self.config.vae.kl_weight * kl, reconstruction, kl

  def loss(self, model, frozen, batch, rng):
    del frozen
    loss, reconstruction, kl = self._losses(model, batch, rng)
    loss = jnp.mean(loss)
    return loss, dict(reconstruction=jnp.mean(reconstruction), kl=jnp.mean(kl))

  def eval_metrics(self, model, frozen, batch, rng):
    del frozen
    loss, reconstruction, kl = self._losses(model, batch, rng)
    mean, _ = model.encode(batch["image"])
    psnr = vae_lib.psnr(model.decode(mean), batch["image"])
    return dict(loss=loss, reconstruction=reconstruction, kl=kl, psnr=psnr)

  def picture(self, graphdef, state, batch):
    count = self.config.eval.picture_examples
    x = parallel.gather_to_host(batch["image"])[:count]
    x_hat = reconstruct(graphdef, state.eval_params(), state.rest, jnp.asarray(x))
    return images.comparison(images.to_uint8(x), images.to_uint8(np.asarray(x_hat)))

  def fid_images(self, graphdef, state, batches: Iterator[dict], num_images: int) -> np.ndarray:
    """Reconstructions of eval images: the autoencoder's own FID, which caps
    the FID that any latent diffusion model on top of it can reach."""
    out, have = [], 0
    for batch in batches:
      x_hat = reconstruct(graphdef, state.eval_params(), state.rest, batch["image"])
      x_hat, mask = parallel.gather_to_host((x_hat, batch["mask"]))
      keep = mask > 0
      out.append(images.to_uint8(x_hat)[keep])
      have += int(keep.sum())
      if have >= num_images:
        break
    return np.concatenate(out)[:num_images]
