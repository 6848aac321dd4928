"""A patch critic for adversarial autoencoder training, and its pure losses.

The critic scores each receptive-field patch of an image as real or
reconstructed (pix2pix's PatchGAN, sized for 32x32 images): a pixel loss
alone is minimised by the average of the plausible images, which is blurred,
and the critic's gradient pushes the decoder back towards sharp ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ldm_jax.models.layers import Conv, group_norm

# The slope pix2pix and the latent-diffusion autoencoders use in their critics.
LEAKY_SLOPE = 0.2


class PatchCritic(nnx.Module):
  """Images (B, H, W, C) in [-1, 1] -> logits (B, H / 2**levels, W / 2**levels).

  `levels` stride-2 3x3 convolutions (`channels`, doubled at each level), each
  followed by GroupNorm (but the first) and a leaky ReLU, then a 3x3
  convolution to one logit per position. With two levels each logit sees a
  15x15 patch of a 32x32 image.
  """

  def __init__(self, *, image_channels: int = 3, channels: int = 64, levels: int = 2,
               dtype: str | jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    if levels < 1 or channels < 1:
      raise ValueError(f"levels and channels must be positive, got {levels}, {channels}")
    dtype = jnp.dtype(dtype)
    convs, norms = [], []
    width = image_channels
    for level in range(levels):
      out = channels * 2 ** level
      convs.append(Conv(width, out, (3, 3), strides=(2, 2), dtype=dtype, rngs=rngs))
      # The first level has no norm, as in pix2pix: normalising the raw pixels'
      # features would throw away the colour statistics the critic should see.
      norms.append(group_norm(out, dtype=dtype, rngs=rngs) if level else None)
      width = out
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    self.to_logits = Conv(width, 1, (3, 3), dtype=dtype, rngs=rngs)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x.astype(self.dtype)
    for conv, norm in zip(self.convs, self.norms):
      h = conv(h)
      if norm is not None:
        h = norm(h)
      h = jax.nn.leaky_relu(h, LEAKY_SLOPE)
    return self.to_logits(h)[..., 0].astype(jnp.float32)


def critic_hinge_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  """The critic's hinge loss (Lim & Ye 2017), per example: mean over patches of
  relu(1 - real) + relu(1 + fake), halved. 0 once every real patch scores >= 1
  and every fake one <= -1; 1 for a critic that outputs 0 everywhere."""
  per_patch = jax.nn.relu(1.0 - real_logits) + jax.nn.relu(1.0 + fake_logits)
  return 0.5 * per_patch.reshape(per_patch.shape[0], -1).mean(axis=-1)


def generator_loss(fake_logits: jax.Array) -> jax.Array:
  """The decoder's side of the hinge game, per example: -mean logit of its
  reconstructions (lower once the critic scores them as real)."""
  return -fake_logits.reshape(fake_logits.shape[0], -1).mean(axis=-1)


def balanced_adversarial_direction(reconstruction_grad: jax.Array,
                                   adversarial_grad: jax.Array,
                                   weight: float) -> jax.Array:
  """The adversarial gradient at the decoded images, rescaled to `weight`
  times the norm of the reconstruction loss's gradient there.

  Latent diffusion's autoencoders balance the two terms the same way, by
  gradient norms at the decoder's last layer (Esser et al. 2021); at the
  images themselves the balance needs no second pass through the decoder.
  The result is a constant: the caller adds sum(direction * x_hat) to its
  loss, so the decoder receives exactly this gradient at its output.
  """
  norm = lambda g: jnp.sqrt(jnp.sum(jnp.square(g)))
  scale = weight * norm(reconstruction_grad) / (norm(adversarial_grad) + 1e-12)
  return jax.lax.stop_gradient(scale * adversarial_grad)
