"""Building blocks shared by the VAE and the denoisers.

All modules work on NHWC feature maps with float32 parameters. `dtype` is
the compute dtype (activations and matmul inputs): bfloat16 gives mixed
precision, with parameters kept in float32 and normalisation statistics and
softmax computed in float32 by the layers themselves. Pure helpers
(`timestep_embedding`, `num_groups_for`, `upsample_nearest`) are plain
functions so they can be tested and reused without a module around them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ldm_jax.kernels import conv as conv_kernels

# Every convolution of the models: `nnx.Conv` (same parameters, same
# checkpoints) whose float32 CPU convolutions run on oneDNN when one CPU is
# the whole backend, and on XLA everywhere else (ldm_jax/kernels/conv.py).
Conv = functools.partial(
    nnx.Conv, conv_general_dilated=conv_kernels.conv_general_dilated)

# Used for output projections that should start close to zero (the denoiser's
# final conv, the VAE's moments). Zero-init would make every upstream gradient
# exactly zero at step 0; a small but nonzero variance keeps the initial output
# near zero while every parameter still receives gradient.
small_init = nnx.initializers.variance_scaling(
    1e-2, "fan_in", "truncated_normal")


def timestep_embedding(
    t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps.

  Args:
    t: (B,) timesteps, integer or float.
    dim: embedding width. An odd `dim` gets one zero column at the end.
    max_period: longest wavelength; the shortest is 2*pi.

  Returns:
    (B, dim) float32 array laid out as [cos(t * f_k) ..., sin(t * f_k) ...]
    with frequencies f_k spaced geometrically from 1 to 1 / max_period.
  """
  if dim < 2:
    raise ValueError(f"timestep embedding dim must be >= 2, got {dim}")
  half = dim // 2
  freqs = jnp.exp(
      -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  embedding = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
  if dim % 2:
    embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
  return embedding


def num_groups_for(channels: int, max_groups: int = 32) -> int:
  """Largest group count <= `max_groups` that divides `channels`.

  The usual GroupNorm(32) breaks for the tiny widths used in tests and for
  widths that are not multiples of 32; this keeps 32 groups whenever it can.
  """
  for groups in range(min(max_groups, channels), 0, -1):
    if channels % groups == 0:
      return groups
  raise ValueError(f"channels must be positive, got {channels}")


class GroupNorm(nnx.Module):
  """Group normalisation over the channel (last) axis of (B, ..., C) maps.

  The parameters (`scale`, `bias`, float32) and the result are those of
  `nnx.GroupNorm` with its default fast variance (E[x^2] - E[x]^2), to float32
  rounding. Two things differ in how it is computed, both for speed on XLA:CPU
  (bench/README.md, round 8):
    * each statistic is a sum over the positions, giving (B, C), then a sum
      over the channels of each group. XLA:CPU sums the positions of an
      NHWC map fast (YNNPACK's reduce); the one reduction over positions and
      group channels together that `nnx.GroupNorm` writes was 3-14x slower.
    * the normalisation is one per-example, per-channel affine map, so the
      element-wise pass over the map only broadcasts (B, C) arrays. An
      optional FiLM `modulation` (scale, shift), each (B, C), folds into
      that map instead of costing two more passes.
  Statistics and the affine map run in float32 whatever `dtype` is; the
  result is cast to `dtype`.
  """

  def __init__(self, channels: int, *, num_groups: int, epsilon: float = 1e-6,
               dtype=jnp.float32, rngs: nnx.Rngs):
    if channels % num_groups:
      raise ValueError(
          f"num_groups ({num_groups}) must divide channels ({channels})")
    # Ones and zeros need no randomness, but drawing the two keys that
    # nnx.GroupNorm draws keeps every later layer's initialisation the same.
    rngs.params(), rngs.params()
    self.num_groups = num_groups
    self.epsilon = epsilon
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

  def __call__(
      self, x: jax.Array,
      modulation: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Normalised x; with `modulation=(s, t)`, normalised x * (1 + s) + t."""
    batch, channels = x.shape[0], x.shape[-1]
    group_size = channels // self.num_groups
    x32 = x.astype(jnp.float32)
    rows = x32.reshape(batch, -1, channels)
    count = rows.shape[1] * group_size

    def group_mean(values):  # (B, positions, C) -> (B, groups)
      per_channel = values.sum(axis=1)
      return per_channel.reshape(batch, self.num_groups, group_size).sum(-1) / count

    mean = group_mean(rows)
    var = jnp.maximum(group_mean(jnp.square(rows)) - jnp.square(mean), 0.0)
    inv_std = jax.lax.rsqrt(var + self.epsilon)
    # (B, groups) -> (B, C): each group's statistic for each of its channels.
    mean = jnp.repeat(mean, group_size, axis=1)
    gain = jnp.repeat(inv_std, group_size, axis=1) * self.scale[...]
    offset = jnp.broadcast_to(self.bias[...], gain.shape)
    if modulation is not None:
      film_scale, film_shift = (m.astype(jnp.float32) for m in modulation)
      gain = gain * (1.0 + film_scale)
      offset = offset * (1.0 + film_scale) + film_shift
    per_channel = (batch,) + (1,) * (x.ndim - 2) + (channels,)
    out = ((x32 - mean.reshape(per_channel)) * gain.reshape(per_channel)
           + offset.reshape(per_channel))
    return out.astype(self.dtype)


def group_norm(channels: int, *, dtype=jnp.float32,
               rngs: nnx.Rngs) -> GroupNorm:
  return GroupNorm(channels, num_groups=num_groups_for(channels),
                   epsilon=1e-6, dtype=dtype, rngs=rngs)


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
  """Nearest-neighbour upsampling of an NHWC map by an integer factor.

  `jnp.repeat` is exact and lowers to a broadcast, which XLA fuses into the
  following conv more readily than a general `jax.image.resize`.
  """
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


class Downsample(nnx.Module):
  """Halves H and W with a stride-2 3x3 conv (learned, keeps channels)."""

  def __init__(self, channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.conv = Conv(channels, channels, (3, 3), strides=(2, 2),
                     dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample(nnx.Module):
  """Doubles H and W: nearest resize then a 3x3 conv.

  Chosen over ConvTranspose: no checkerboard artefacts, and measurably faster
  under XLA on CPU (see bench/bench_models.py).
  """

  def __init__(self, channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.conv = Conv(channels, channels, (3, 3), dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(upsample_nearest(x))


class ResBlock(nnx.Module):
  """GroupNorm -> SiLU -> 3x3 conv, twice, around a residual connection.

  With `emb_dim` the block is conditioned on an embedding (time + class) by a
  per-channel scale and shift applied after the second GroupNorm (FiLM, as in
  the improved DDPM / ADM UNet). A 1x1 conv matches channels on the skip path
  when they change. Dropout, when built, acts before the second conv.
  """

  def __init__(
      self,
      in_channels: int,
      out_channels: int,
      *,
      emb_dim: int | None = None,
      dropout: float | None = None,
      dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.norm1 = group_norm(in_channels, dtype=dtype, rngs=rngs)
    self.conv1 = Conv(in_channels, out_channels, (3, 3), dtype=dtype, rngs=rngs)
    self.emb_proj = (
        nnx.Linear(emb_dim, 2 * out_channels, dtype=dtype, rngs=rngs)
        if emb_dim is not None else None)
    self.norm2 = group_norm(out_channels, dtype=dtype, rngs=rngs)
    # `dropout=None` builds no Dropout at all (the VAE: no RNG stream in its
    # state). Any float, even 0.0, builds one, so that a denoiser always has
    # the `deterministic` switch that `nnx.view(model, deterministic=...)`
    # looks for, whatever its dropout rate.
    self.dropout = (
        nnx.Dropout(dropout, rngs=rngs) if dropout is not None else None)
    self.conv2 = Conv(out_channels, out_channels, (3, 3), dtype=dtype, rngs=rngs)
    self.skip = (
        Conv(in_channels, out_channels, (1, 1), dtype=dtype, rngs=rngs)
        if in_channels != out_channels else None)

  def __call__(self, x: jax.Array, emb: jax.Array | None = None) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    modulation = None
    if self.emb_proj is not None:
      if emb is None:
        raise ValueError("this ResBlock was built with emb_dim; pass emb")
      modulation = tuple(
          jnp.split(self.emb_proj(jax.nn.silu(emb)), 2, axis=-1))
    h = jax.nn.silu(self.norm2(h, modulation))
    if self.dropout is not None:
      h = self.dropout(h)
    h = self.conv2(h)
    skip = x if self.skip is None else self.skip(x)
    return skip + h


def as_rows(x: jax.Array) -> jax.Array:
  """(..., F) -> (N, F): one row per position, token or example."""
  return x.reshape(-1, x.shape[-1])


def pointwise_conv(conv: nnx.Conv, rows: jax.Array) -> jax.Array:
  """A 1x1 `nnx.Conv` applied to (N, Cin) rows as one matmul.

  The same arithmetic as calling the conv on the map the rows came from,
  with its parameters as they are (so checkpoints do not change), but
  XLA:CPU runs the dot and its gradients faster than a 1x1 convolution.
  """
  kernel = conv.kernel[...]
  if (kernel.shape[:-2] != (1, 1) or conv.strides not in (1, (1, 1))
      or conv.feature_group_count != 1):
    raise ValueError(f"pointwise_conv needs an ungrouped 1x1 conv with stride "
                     f"1, got kernel {kernel.shape} and strides {conv.strides}")
  dtype = conv.dtype or rows.dtype
  out = rows.astype(dtype) @ kernel.reshape(kernel.shape[-2:]).astype(dtype)
  if conv.bias is not None:
    out = out + conv.bias[...].astype(dtype)
  return out


class MultiHeadAttention(nnx.Module):
  """Multi-head dot-product attention from `queries` to `context` tokens.

  Written out rather than using `nnx.MultiHeadAttention` for one reason: the
  key projection has no bias. A key bias adds the same logit to every key of
  a query, softmax cancels it, so its gradient is identically zero and it
  would be a dead parameter.
  """

  def __init__(
      self,
      features: int,
      *,
      num_heads: int = 1,
      context_features: int | None = None,
      dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    if features % num_heads:
      raise ValueError(
          f"attention features ({features}) must be divisible by num_heads "
          f"({num_heads})")
    context_features = context_features or features
    self.num_heads = num_heads
    self.query = nnx.Linear(features, features, dtype=dtype, rngs=rngs)
    self.key = nnx.Linear(context_features, features, use_bias=False,
                          dtype=dtype, rngs=rngs)
    self.value = nnx.Linear(context_features, features, dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(features, features, dtype=dtype, rngs=rngs)

  def __call__(
      self, queries: jax.Array, context: jax.Array | None = None
  ) -> jax.Array:
    """(B, Tq, features) queries, (B, Tk, context_features) context."""
    context = queries if context is None else context

    def heads(rows, like):  # (B*T, F) -> (B, T, heads, F / heads)
      return rows.reshape(like.shape[:2] + (self.num_heads, -1))

    # The projections act on (B*T, F) rows: XLA:CPU runs a 2-D dot without
    # the transposes it adds around a dot over (B, T, F) (bench/README.md,
    # round 14). Reshapes between the two are free.
    query_rows, context_rows = as_rows(queries), as_rows(context)
    attended = jax.nn.dot_product_attention(
        heads(self.query(query_rows), queries), heads(self.key(context_rows), context),
        heads(self.value(context_rows), context))
    attended_rows = attended.reshape(query_rows.shape[0], -1)  # Heads joined.
    return self.out(attended_rows).reshape(queries.shape)


class AttentionBlock(nnx.Module):
  """Transformer block over the pixels of a feature map.

  Self-attention among the H*W positions, then (when `context_dim` is given)
  cross-attention from the positions to a sequence of context tokens, then a
  GELU MLP; each sub-layer is pre-LayerNorm and residual. The whole block sits
  between a GroupNorm + 1x1 projection in and a 1x1 projection out, with its
  own residual, like the spatial transformer of latent diffusion.
  """

  def __init__(
      self,
      channels: int,
      *,
      num_heads: int = 1,
      context_dim: int | None = None,
      mlp_ratio: int = 4,
      dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.norm = group_norm(channels, dtype=dtype, rngs=rngs)
    self.proj_in = Conv(channels, channels, (1, 1), dtype=dtype, rngs=rngs)
    self.self_norm = nnx.LayerNorm(channels, dtype=dtype, rngs=rngs)
    self.self_attn = MultiHeadAttention(
        channels, num_heads=num_heads, dtype=dtype, rngs=rngs)
    if context_dim is not None:
      self.cross_norm = nnx.LayerNorm(channels, dtype=dtype, rngs=rngs)
      self.cross_attn = MultiHeadAttention(
          channels, num_heads=num_heads, context_features=context_dim,
          dtype=dtype, rngs=rngs)
    else:
      self.cross_norm = None
      self.cross_attn = None
    if mlp_ratio > 0:
      self.mlp_norm = nnx.LayerNorm(channels, dtype=dtype, rngs=rngs)
      self.mlp_in = nnx.Linear(channels, mlp_ratio * channels, dtype=dtype, rngs=rngs)
      self.mlp_out = nnx.Linear(mlp_ratio * channels, channels, dtype=dtype, rngs=rngs)
    else:
      self.mlp_norm = self.mlp_in = self.mlp_out = None
    self.proj_out = Conv(channels, channels, (1, 1), dtype=dtype, rngs=rngs)

  def __call__(
      self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    batch, height, width, channels = x.shape
    tokens = (batch, height * width, channels)
    # Everything that acts on one position at a time (LayerNorms, the MLP,
    # the 1x1 projections) runs on (B*H*W, C) rows, as 2-D dots: 1.1x
    # faster for this block on XLA:CPU than over (B, H, W, C) maps.
    h = pointwise_conv(self.proj_in, as_rows(self.norm(x)))
    h = h + as_rows(self.self_attn(self.self_norm(h).reshape(tokens)))
    if self.cross_attn is not None:
      if context is None:
        raise ValueError("this AttentionBlock was built with context_dim; "
                         "pass context")
      h = h + as_rows(self.cross_attn(self.cross_norm(h).reshape(tokens), context))
    if self.mlp_in is not None:
      h = h + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(h))))
    h = pointwise_conv(self.proj_out, h)
    return x + h.reshape(x.shape)
