"""Class-conditional UNet denoiser for spatial latents.

ADM-style layout (improved DDPM / guided diffusion): residual blocks with
scale-shift time conditioning, self-attention at the low resolutions, skip
connections between mirrored levels. Class conditioning enters twice, as in
latent diffusion: through cross-attention to a few learned class tokens in
every attention block, and as a pooled vector added to the time embedding.
Row `num_classes` of the class table is the learned null class used for
classifier-free guidance. The attention blocks have no MLP, as in ADM,
unless `attention_mlp_ratio` gives one (latent diffusion's transformer block).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ldm_jax.models.layers import (
    DEFAULT_NORM_GROUPS, AttentionBlock, Conv, Downsample, ResBlock, Upsample, group_norm, small_init,
    timestep_embedding)


class _Level(nnx.Module):
  """Residual blocks of one resolution, their attention blocks (possibly
  none) and the resampling that ends the level (None for the last one)."""

  def __init__(self, res_blocks, attn_blocks, resample):
    self.res_blocks = nnx.List(res_blocks)
    self.attn_blocks = nnx.List(attn_blocks)
    self.resample = resample

  def block(self, index: int, h, emb, context):
    h = self.res_blocks[index](h, emb)
    if len(self.attn_blocks):
      h = self.attn_blocks[index](h, context)
    return h


class UNet(nnx.Module):
  """Predicts noise (or x0 / v) for latents z_t of shape (B, *latent_shape).

  Call as ``model(z_t, t, labels)`` with t (B,) timesteps (int or float) and
  labels (B,) int32 in [0, num_classes], `num_classes` meaning "no class".
  Dropout is active unless the model is in eval mode
  (``nnx.view(model, deterministic=True)`` or ``model.eval()``). `dtype` is
  the compute dtype (bfloat16 for mixed precision; parameters stay float32);
  the output is float32 either way.
  """

  def __init__(
      self,
      *,
      latent_shape: Sequence[int] = (16, 16, 4),
      num_classes: int = 100,
      channels: int = 128,
      channel_multipliers: Sequence[int] = (1, 2, 2),
      num_res_blocks: int = 2,
      attention_levels: Sequence[int] = (1, 2),
      num_heads: int = 4,
      context_dim: int = 256,
      context_tokens: int = 4,
      attention_mlp_ratio: int = 0,
      dropout: float = 0.1,
      norm_groups: int = DEFAULT_NORM_GROUPS,
      dtype: str | jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    dtype = jnp.dtype(dtype)
    latent_shape = tuple(latent_shape)
    channel_multipliers = tuple(channel_multipliers)
    attention_levels = tuple(sorted(set(attention_levels)))
    num_levels = len(channel_multipliers)
    if len(latent_shape) != 3:
      raise ValueError(
          f"UNet needs a spatial latent (H, W, C), got {latent_shape}; use "
          "MLPDenoiser for vector latents")
    if not channel_multipliers or min(channel_multipliers) < 1:
      raise ValueError("channel_multipliers must be a non-empty sequence of "
                       f"positive ints, got {channel_multipliers}")
    factor = 2 ** (num_levels - 1)
    if latent_shape[0] % factor or latent_shape[1] % factor:
      raise ValueError(
          f"latent H, W {latent_shape[:2]} must be divisible by the "
          f"downsampling factor 2**(len(channel_multipliers) - 1) = {factor}")
    if any(not 0 <= level < num_levels for level in attention_levels):
      raise ValueError(f"attention_levels {attention_levels} must lie in "
                       f"[0, {num_levels}) (one per channel multiplier)")
    for name, value in (("num_classes", num_classes), ("channels", channels),
                        ("num_res_blocks", num_res_blocks),
                        ("num_heads", num_heads), ("context_dim", context_dim),
                        ("context_tokens", context_tokens)):
      if value < 1:
        raise ValueError(f"{name} must be positive, got {value}")
    if attention_mlp_ratio < 0:
      raise ValueError(f"attention_mlp_ratio must be >= 0 (0: no MLP), got {attention_mlp_ratio}")
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    widths = [channels * m for m in channel_multipliers]
    for level in attention_levels + (num_levels - 1,):
      if widths[level] % num_heads:
        raise ValueError(
            f"width {widths[level]} at attention level {level} is not "
            f"divisible by num_heads={num_heads}")

    self.latent_shape = latent_shape
    self.num_classes = num_classes
    self.context_tokens = context_tokens
    self.context_dim = context_dim
    self.time_embed_dim = channels
    emb_dim = 4 * channels

    self.time_in = nnx.Linear(channels, emb_dim, dtype=dtype, rngs=rngs)
    self.time_out = nnx.Linear(emb_dim, emb_dim, dtype=dtype, rngs=rngs)
    # num_classes + 1 rows: the last one is the learned null class.
    self.class_embed = nnx.Embed(
        num_classes + 1, context_tokens * context_dim, dtype=dtype, rngs=rngs)
    self.class_to_emb = nnx.Linear(context_dim, emb_dim, dtype=dtype,
                                   rngs=rngs)

    def res(cin, cout):
      return ResBlock(cin, cout, emb_dim=emb_dim, dropout=dropout,
                      norm_groups=norm_groups, dtype=dtype, rngs=rngs)

    def attn(width):
      return AttentionBlock(
          width, num_heads=num_heads, context_dim=context_dim,
          mlp_ratio=attention_mlp_ratio, norm_groups=norm_groups, dtype=dtype, rngs=rngs)

    self.conv_in = Conv(latent_shape[-1], widths[0], (3, 3), dtype=dtype,
                        rngs=rngs)
    skip_widths = [widths[0]]
    in_ch = widths[0]
    down_levels = []
    for level, width in enumerate(widths):
      res_blocks, attn_blocks = [], []
      for _ in range(num_res_blocks):
        res_blocks.append(res(in_ch, width))
        if level in attention_levels:
          attn_blocks.append(attn(width))
        in_ch = width
        skip_widths.append(in_ch)
      downsample = None
      if level < num_levels - 1:
        downsample = Downsample(in_ch, dtype=dtype, rngs=rngs)
        skip_widths.append(in_ch)
      down_levels.append(_Level(res_blocks, attn_blocks, downsample))
    self.down_levels = nnx.List(down_levels)

    # Always attend at the bottom: it is the cheapest place, and it
    # guarantees the cross-attention path to the class tokens exists even
    # with attention_levels=().
    self.mid_res1 = res(in_ch, in_ch)
    self.mid_attn = attn(in_ch)
    self.mid_res2 = res(in_ch, in_ch)

    up_levels = []
    for level in reversed(range(num_levels)):
      res_blocks, attn_blocks = [], []
      # One more block than on the way down: it consumes the skip saved
      # after that level's downsampling (or after conv_in at level 0).
      for _ in range(num_res_blocks + 1):
        res_blocks.append(res(in_ch + skip_widths.pop(), widths[level]))
        if level in attention_levels:
          attn_blocks.append(attn(widths[level]))
        in_ch = widths[level]
      upsample = (Upsample(in_ch, dtype=dtype, rngs=rngs) if level > 0
                  else None)
      up_levels.append(_Level(res_blocks, attn_blocks, upsample))
    self.up_levels = nnx.List(up_levels)

    self.out_norm = group_norm(in_ch, max_groups=norm_groups, dtype=dtype, rngs=rngs)
    self.conv_out = Conv(
        in_ch, latent_shape[-1], (3, 3), kernel_init=small_init, dtype=dtype,
        rngs=rngs)

  def class_context(self, labels: jax.Array) -> jax.Array:
    """(B,) labels -> (B, context_tokens, context_dim) cross-attention tokens."""
    tokens = self.class_embed(labels)
    return tokens.reshape(labels.shape[0], self.context_tokens,
                          self.context_dim)

  def __call__(
      self, z_t: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
    """Denoiser output, same shape as z_t.

    Args:
      z_t: (B, H, W, C) noisy latents.
      t: (B,) timesteps, integer or float.
      labels: (B,) int class ids; `num_classes` is the null class.
    """
    context = self.class_context(labels)
    emb = timestep_embedding(t, self.time_embed_dim)
    emb = self.time_out(jax.nn.silu(self.time_in(emb)))
    emb = emb + self.class_to_emb(context.mean(axis=1))

    h = self.conv_in(z_t)
    skips = [h]
    for level in self.down_levels:
      for i in range(len(level.res_blocks)):
        h = level.block(i, h, emb, context)
        skips.append(h)
      if level.resample is not None:
        h = level.resample(h)
        skips.append(h)

    h = self.mid_res1(h, emb)
    h = self.mid_attn(h, context)
    h = self.mid_res2(h, emb)

    for level in self.up_levels:
      for i in range(len(level.res_blocks)):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = level.block(i, h, emb, context)
      if level.resample is not None:
        h = level.resample(h)

    # float32 out whatever the compute dtype: the loss and the samplers'
    # arithmetic stay in full precision.
    out = self.conv_out(self.out_norm(h, silu=True))
    return out.astype(jnp.float32)
