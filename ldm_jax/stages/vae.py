"""Stage "vae": the autoencoder, trained on reconstruction + kl_weight * KL.

With `vae.adversarial.weight > 0` a patch critic (models/critic.py) trains
beside it, and the decoder also follows the critic's gradient, rescaled to
`weight` times the reconstruction gradient's norm at the decoded images. The
critic's parameters sit in the stage's model under `critic`, so both train
through the one loop with one optimiser; `autoencoder_state` drops them for
whoever only needs the autoencoder (the LDM's frozen VAE).
"""

from __future__ import annotations

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ldm_jax import images, parallel
from ldm_jax.models import critic as critic_lib
from ldm_jax.models import vae as vae_lib
from ldm_jax.stages import base


@functools.partial(jax.jit, static_argnums=0)
def reconstruct(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State,
                x: jax.Array) -> jax.Array:
  """Decodes the posterior mean: the autoencoder's deterministic output."""
  model = nnx.merge(graphdef, params, rest)
  mean, _ = model.encode(x)
  return model.decode(mean)


CRITIC = "critic"  # Where the critic's parameters sit in an adversarial VAE run.


class VAEWithCritic(vae_lib.VAE):
  """The autoencoder plus the patch critic that trains against it.

  The autoencoder's part is built first from the same keys, so it starts
  from the same weights as a run without the critic.
  """

  def __init__(self, *, critic: dict, rngs: nnx.Rngs, **autoencoder):
    super().__init__(**autoencoder, rngs=rngs)
    self.critic = critic_lib.PatchCritic(image_channels=autoencoder.get("image_channels", 3),
                                         dtype=autoencoder.get("dtype", "float32"),
                                         **critic, rngs=rngs)


def autoencoder_state(state: nnx.State) -> nnx.State:
  """A VAE run's parameters (or other state) without the critic's, if any."""
  return nnx.State({key: value for key, value in state.items() if key != CRITIC})


def adversarial_weight(config) -> float:
  # Runs saved before the adversarial term existed have no key: they had none.
  return float(config.vae.get("adversarial", {}).get("weight", 0.0))


class VAEStage(base.Stage):
  picture_name = "comparison.png"

  @property
  def clip_separately(self) -> tuple[str, ...]:
    return (CRITIC,) if adversarial_weight(self.config) > 0 else ()

  def build_model(self, rngs: nnx.Rngs) -> vae_lib.VAE:
    dtype = self.config.train.get("compute_dtype", "float32")
    if adversarial_weight(self.config) > 0:
      settings = self.config.vae.adversarial
      return VAEWithCritic(**self.config.vae.model, dtype=dtype, rngs=rngs,
                           critic=dict(channels=settings.critic_channels,
                                       levels=settings.critic_levels))
    return vae_lib.VAE(**self.config.vae.model, dtype=dtype, rngs=rngs)

  def _losses(self, model, batch, rng):
    x = batch["image"]
    x_hat, mean, logvar = model(x, rng)
    reconstruction = vae_lib.reconstruction_loss(x_hat, x, self.config.vae.reconstruction_loss)
    kl = vae_lib.gaussian_kl(mean, logvar)
    return reconstruction + self.config.vae.kl_weight * kl, reconstruction, kl, x_hat

  def loss(self, model, frozen, batch, rng):
    del frozen
    loss, reconstruction, kl, x_hat = self._losses(model, batch, rng)
    loss = jnp.mean(loss)
    metrics = dict(reconstruction=jnp.mean(reconstruction), kl=jnp.mean(kl))
    if adversarial_weight(self.config) > 0:
      adversarial_loss, adversarial_metrics = self._adversarial_loss(
          model, batch["image"], x_hat, batch[base.STEP])
      loss = loss + adversarial_loss
      metrics.update(adversarial_metrics)
    return loss, metrics

  def _adversarial_loss(self, model, x, x_hat, step):
    """The critic's hinge loss plus the decoder's balanced adversarial term.

    Each part reaches only its own parameters: the critic sees the
    reconstructions as constants, and the decoder's term is a constant
    direction (the critic's gradient at x_hat, through a copy of the critic
    whose weights are constants) dotted with x_hat. The critic trains from
    step 0; the decoder follows it from `adversarial.start_step`, once the
    critic has learnt something to follow.
    """
    critic = model.critic
    critic_graphdef, critic_state = nnx.split(critic)
    constant_critic = nnx.merge(critic_graphdef, jax.lax.stop_gradient(critic_state))
    fixed_x_hat = jax.lax.stop_gradient(x_hat)
    generator, adversarial_grad = jax.value_and_grad(
        lambda images: critic_lib.generator_loss(constant_critic(images)).mean())(fixed_x_hat)
    kind = self.config.vae.reconstruction_loss
    reconstruction_grad = jax.grad(
        lambda images: vae_lib.reconstruction_loss(images, x, kind).mean())(fixed_x_hat)
    settings = self.config.vae.adversarial
    weight = jnp.where(step >= settings.start_step, settings.weight, 0.0)
    direction = critic_lib.balanced_adversarial_direction(
        reconstruction_grad, adversarial_grad, weight)
    # Real and reconstructed images in one batch: one critic call, and one
    # set of GroupNorm statistics per image either way.
    logits = critic(jnp.concatenate([x, fixed_x_hat]))
    real_logits, fake_logits = jnp.split(logits, 2)
    critic_loss = critic_lib.critic_hinge_loss(real_logits, fake_logits).mean()
    return critic_loss + jnp.sum(direction * x_hat), dict(
        critic=critic_loss, generator=generator,
        real_logit=jnp.mean(real_logits), fake_logit=jnp.mean(fake_logits))

  def eval_metrics(self, model, frozen, batch, rng):
    del frozen
    loss, reconstruction, kl, _ = self._losses(model, batch, rng)
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
