"""Convolutional VAE for 32x32 images in [-1, 1], and its pure loss helpers.

The encoder maps an image to a diagonal Gaussian posterior over the latent;
the decoder maps a latent sample back to pixel space. Two latent forms:

* ``'spatial'``: a (H/f, W/f, latent_channels) map, f = 2**(levels - 1), as
  in Stable Diffusion's autoencoder. The project default (f=2, 16x16x4).
* ``'vector'``: a flat vector of ``latent_dim`` obtained by flattening the
  lowest-resolution feature map and a Dense layer, as in the original project.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ldm_jax.models.layers import (
    DEFAULT_NORM_GROUPS, AttentionBlock, Conv, Downsample, ResBlock, Upsample, group_norm,
    small_init)

LATENT_FORMS = ("spatial", "vector")
RECONSTRUCTION_KINDS = ("l1", "l2")
# exp(-30) ~ 1e-13 and exp(20) ~ 5e8: wide enough never to bind in normal
# training, tight enough that exp(logvar) cannot overflow float32 or give a
# zero variance whose log appears in the KL.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)), summed over all but the batch axis.

  Returns:
    (B,) per-example KL in nats.
  """
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return kl.reshape(kl.shape[0], -1).sum(axis=-1)


def reconstruction_loss(
    x_hat: jax.Array, x: jax.Array, kind: str = "l1") -> jax.Array:
  """Per-example pixel loss, averaged over H, W and channels.

  Args:
    x_hat: (B, ...) reconstruction.
    x: (B, ...) target, same shape.
    kind: 'l1' (mean absolute error) or 'l2' (mean squared error).

  Returns:
    (B,) losses.
  """
  diff = (x_hat - x).reshape(x.shape[0], -1)
  if kind == "l1":
    return jnp.abs(diff).mean(axis=-1)
  if kind == "l2":
    return jnp.square(diff).mean(axis=-1)
  raise ValueError(
      f"unknown reconstruction loss {kind!r}; expected one of "
      f"{RECONSTRUCTION_KINDS}")


def psnr(x_hat: jax.Array, x: jax.Array) -> jax.Array:
  """Per-example PSNR in dB for images in [-1, 1].

  Both images are clipped to [-1, 1] and mapped to [0, 1] first, so the peak
  is 1 and the number is comparable with PSNRs reported on 8-bit images.
  Identical images give +inf.
  """
  to_unit = lambda a: (jnp.clip(a, -1.0, 1.0) + 1.0) / 2.0
  mse = jnp.square(to_unit(x_hat) - to_unit(x))
  mse = mse.reshape(mse.shape[0], -1).mean(axis=-1)
  return -10.0 * jnp.log10(mse)


class VAE(nnx.Module):
  """Convolutional VAE with a diagonal Gaussian posterior.

  Widths are ``channels * channel_multipliers[level]``; each level but the
  last ends in a stride-2 downsampling, so f = 2**(len(channel_multipliers)-1).
  The decoder mirrors the encoder and upsamples by nearest resize + conv.
  `dtype` is the compute dtype (bfloat16 for mixed precision; parameters stay
  float32); the posterior moments and the decoded images are float32.
  """

  def __init__(
      self,
      *,
      image_size: int = 32,
      image_channels: int = 3,
      latent: str = "spatial",
      channels: int = 64,
      channel_multipliers: Sequence[int] = (1, 2),
      num_res_blocks: int = 2,
      latent_channels: int = 4,
      latent_dim: int = 128,
      attention: bool = False,
      norm_groups: int = DEFAULT_NORM_GROUPS,
      dtype: str | jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    dtype = jnp.dtype(dtype)
    norm = dict(norm_groups=norm_groups, dtype=dtype, rngs=rngs)
    channel_multipliers = tuple(channel_multipliers)
    if latent not in LATENT_FORMS:
      raise ValueError(
          f"unknown latent form {latent!r}; expected one of {LATENT_FORMS}")
    if not channel_multipliers or min(channel_multipliers) < 1:
      raise ValueError("channel_multipliers must be a non-empty sequence of "
                       f"positive ints, got {channel_multipliers}")
    for name, value in (("image_size", image_size),
                        ("image_channels", image_channels),
                        ("channels", channels),
                        ("latent_channels", latent_channels),
                        ("latent_dim", latent_dim)):
      if value < 1:
        raise ValueError(f"{name} must be positive, got {value}")
    if num_res_blocks < 1:
      # The res blocks are where the width changes between levels.
      raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
    factor = 2 ** (len(channel_multipliers) - 1)
    if image_size % factor:
      raise ValueError(
          f"image_size ({image_size}) must be divisible by the downsampling "
          f"factor 2**(len(channel_multipliers) - 1) = {factor}")

    self.latent = latent
    self.image_size = image_size
    self.latent_channels = latent_channels
    self.latent_dim = latent_dim
    self.bottom_size = image_size // factor
    widths = [channels * m for m in channel_multipliers]
    self.bottom_channels = widths[-1]

    # Encoder.
    self.enc_in = Conv(image_channels, widths[0], (3, 3), dtype=dtype,
                       rngs=rngs)
    enc_blocks, enc_downs = [], []
    in_ch = widths[0]
    for level, width in enumerate(widths):
      blocks = []
      for _ in range(num_res_blocks):
        blocks.append(ResBlock(in_ch, width, **norm))
        in_ch = width
      enc_blocks.append(nnx.List(blocks))
      if level < len(widths) - 1:
        enc_downs.append(Downsample(in_ch, dtype=dtype, rngs=rngs))
    self.enc_blocks = nnx.List(enc_blocks)
    self.enc_downs = nnx.List(enc_downs)
    self.enc_mid = _MidBlock(in_ch, attention, **norm)
    self.enc_norm = group_norm(in_ch, max_groups=norm_groups, dtype=dtype, rngs=rngs)

    bottom_features = self.bottom_size ** 2 * in_ch
    if latent == "spatial":
      self.to_moments = Conv(
          in_ch, 2 * latent_channels, (3, 3), kernel_init=small_init,
          dtype=dtype, rngs=rngs)
      self.from_latent = Conv(latent_channels, in_ch, (3, 3),
                              dtype=dtype, rngs=rngs)
    else:
      self.to_moments = nnx.Linear(
          bottom_features, 2 * latent_dim, kernel_init=small_init,
          dtype=dtype, rngs=rngs)
      self.from_latent = nnx.Linear(latent_dim, bottom_features, dtype=dtype,
                                    rngs=rngs)

    # Decoder: mirror image of the encoder.
    self.dec_mid = _MidBlock(in_ch, attention, **norm)
    dec_blocks, dec_ups = [], []
    for level in reversed(range(len(widths))):
      blocks = []
      for _ in range(num_res_blocks):
        blocks.append(ResBlock(in_ch, widths[level], **norm))
        in_ch = widths[level]
      dec_blocks.append(nnx.List(blocks))
      if level > 0:
        dec_ups.append(Upsample(in_ch, dtype=dtype, rngs=rngs))
    self.dec_blocks = nnx.List(dec_blocks)
    self.dec_ups = nnx.List(dec_ups)
    self.dec_norm = group_norm(in_ch, max_groups=norm_groups, dtype=dtype, rngs=rngs)
    self.dec_out = Conv(in_ch, image_channels, (3, 3), dtype=dtype,
                        rngs=rngs)

  @property
  def latent_shape(self) -> tuple[int, ...]:
    """Per-example latent shape, e.g. (16, 16, 4) or (128,)."""
    if self.latent == "spatial":
      return (self.bottom_size, self.bottom_size, self.latent_channels)
    return (self.latent_dim,)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Posterior moments for images x of shape (B, H, W, C) in [-1, 1].

    Returns:
      (mean, logvar), each (B, *latent_shape); logvar is clipped to
      [LOGVAR_MIN, LOGVAR_MAX].
    """
    h = self.enc_in(x)
    for level, blocks in enumerate(self.enc_blocks):
      for block in blocks:
        h = block(h)
      if level < len(self.enc_downs):
        h = self.enc_downs[level](h)
    h = self.enc_norm(self.enc_mid(h), silu=True)
    if self.latent == "vector":
      h = h.reshape(h.shape[0], -1)
    # The posterior, its sample and the KL are float32 at any compute dtype.
    moments = self.to_moments(h).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def decode(self, z: jax.Array) -> jax.Array:
    """Maps latents (B, *latent_shape) to raw images (B, H, W, C), no tanh."""
    h = self.from_latent(z)
    if self.latent == "vector":
      h = h.reshape(
          z.shape[0], self.bottom_size, self.bottom_size, self.bottom_channels)
    h = self.dec_mid(h)
    for level, blocks in enumerate(self.dec_blocks):
      for block in blocks:
        h = block(h)
      if level < len(self.dec_ups):
        h = self.dec_ups[level](h)
    out = self.dec_out(self.dec_norm(h, silu=True))
    return out.astype(jnp.float32)

  def __call__(
      self, x: jax.Array, rng: jax.Array
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Encodes, samples z with the reparameterisation trick, decodes.

    Args:
      x: (B, H, W, C) images in [-1, 1].
      rng: PRNG key for the posterior sample (explicit, so a pure train step
        owns all randomness).

    Returns:
      (x_hat, mean, logvar).
    """
    mean, logvar = self.encode(x)
    eps = jax.random.normal(rng, mean.shape, mean.dtype)
    z = mean + jnp.exp(0.5 * logvar) * eps
    return self.decode(z), mean, logvar


class _MidBlock(nnx.Module):
  """ResBlock, optional single-head self-attention, ResBlock.

  Used at the lowest resolution of both the encoder and the decoder, where
  attention over all positions is cheapest.
  """

  def __init__(self, channels: int, attention: bool, *, norm_groups: int,
               dtype=jnp.float32, rngs: nnx.Rngs):
    norm = dict(norm_groups=norm_groups, dtype=dtype, rngs=rngs)
    self.res1 = ResBlock(channels, channels, **norm)
    self.attn = (
        AttentionBlock(channels, num_heads=1, mlp_ratio=0, **norm)
        if attention else None)
    self.res2 = ResBlock(channels, channels, **norm)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.res1(x)
    if self.attn is not None:
      x = self.attn(x)
    return self.res2(x)
