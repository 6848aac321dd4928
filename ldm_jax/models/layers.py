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
from jax import lax

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


def _sum_positions(values: jax.Array) -> jax.Array:
  """(B, ..., C) -> (B, C). XLA:CPU sums the positions of an NHWC map fast
  (YNNPACK's reduce); one reduction over positions and group channels
  together, as `nnx.GroupNorm` writes it, was 3-14x slower (bench/README.md,
  round 8)."""
  return values.reshape(values.shape[0], -1, values.shape[-1]).sum(axis=1)


def _sum_groups(per_channel: jax.Array, num_groups: int) -> jax.Array:
  """(B, C) -> (B, groups): the sum over each group's channels."""
  batch, channels = per_channel.shape
  return per_channel.reshape(batch, num_groups, channels // num_groups).sum(-1)


def _each_channel(per_group: jax.Array, channels: int) -> jax.Array:
  """(B, groups) -> (B, C): each group's value for each of its channels."""
  return jnp.repeat(per_group, channels // per_group.shape[1], axis=1)


def _over_map(per_channel: jax.Array, ndim: int) -> jax.Array:
  """(B, C) -> (B, 1, ..., 1, C), broadcastable against a (B, ..., C) map."""
  return per_channel.reshape(
      (per_channel.shape[0],) + (1,) * (ndim - 2) + (per_channel.shape[1],))


def _group_norm_forward(x, scale, bias, film_scale, film_shift, num_groups,
                        epsilon, silu):
  """Float32 result and what the backward pass needs; see `group_norm_act`."""
  x = x.astype(jnp.float32)
  channels = x.shape[-1]
  count = x.size // x.shape[0] // num_groups
  mean = _sum_groups(_sum_positions(x), num_groups) / count
  var = jnp.maximum(
      _sum_groups(_sum_positions(jnp.square(x)), num_groups) / count
      - jnp.square(mean), 0.0)
  inv_std = lax.rsqrt(var + epsilon)
  # The normalisation, scale, bias and FiLM fold into one per-example,
  # per-channel affine map a = x * gain + offset: one pass over the map.
  film_gain = 1.0 + film_scale                     # (B, C)
  gain = _each_channel(inv_std, channels) * scale * film_gain
  offset = ((bias - _each_channel(mean * inv_std, channels) * scale) * film_gain
            + film_shift)
  a = x * _over_map(gain, x.ndim) + _over_map(offset, x.ndim)
  out = a * jax.nn.sigmoid(a) if silu else a
  return out, (mean, inv_std, gain, offset, film_gain)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def group_norm_act(x, scale, bias, film_scale, film_shift, num_groups: int,
                   epsilon: float, silu: bool, dtype):
  """GroupNorm over the last axis of x (B, ..., C), then FiLM, then SiLU.

  silu((normalised x * scale + bias) * (1 + film_scale) + film_shift), with
  `film_scale` and `film_shift` (B, C) (zeros for none) and the statistics,
  in float32, over each example's positions and group channels; the result
  is cast to `dtype`. Its gradient is written out rather than derived by
  autodiff: per (example, channel), two sums over the positions (of the
  incoming gradient and of its product with x) give every parameter's
  gradient and the three coefficients of dx = p * da + q * x + r, so the
  backward pass reads the map twice. The derived one built many more
  map-sized intermediates; the issue-8 UNet step ran 2-4 % faster with this
  one (bench/README.md, round 17).
  """
  out, _ = _group_norm_forward(x, scale, bias, film_scale, film_shift,
                               num_groups, epsilon, silu)
  return out.astype(dtype)


def _group_norm_act_fwd(x, scale, bias, film_scale, film_shift, num_groups,
                        epsilon, silu, dtype):
  out, stats = _group_norm_forward(x, scale, bias, film_scale, film_shift,
                                   num_groups, epsilon, silu)
  return out.astype(dtype), (x, scale, bias, film_scale) + stats


def _group_norm_act_bwd(num_groups, epsilon, silu, dtype, residuals, d_out):
  del epsilon, dtype
  x, scale, bias, film_scale, mean, inv_std, gain, offset, film_gain = residuals
  x32, d_out = x.astype(jnp.float32), d_out.astype(jnp.float32)
  channels = x.shape[-1]
  count = x.size // x.shape[0] // num_groups
  if silu:  # Recomputed: cheaper than keeping a second map-sized residual.
    a = x32 * _over_map(gain, x.ndim) + _over_map(offset, x.ndim)
    sig = jax.nn.sigmoid(a)
    d_a = d_out * (sig * (1.0 + a * (1.0 - sig)))
  else:
    d_a = d_out
  sum_d = _sum_positions(d_a)                                     # (B, C)
  mean_c, inv_std_c = (_each_channel(v, channels) for v in (mean, inv_std))
  # The sum of d_a times the normalised x, from the sum of d_a times x.
  sum_d_xhat = inv_std_c * (_sum_positions(d_a * x32) - mean_c * sum_d)
  d_film_shift = sum_d
  d_film_scale = scale * sum_d_xhat + bias * sum_d
  d_bias = jnp.sum(film_gain * sum_d, axis=0)
  d_scale = jnp.sum(film_gain * sum_d_xhat, axis=0)
  # d xhat = d_a * k; dx = inv_std * (d xhat - group mean of d xhat
  #                                   - xhat * group mean of d xhat * xhat).
  k = scale * film_gain
  mean_dxhat = _each_channel(_sum_groups(k * sum_d, num_groups) / count, channels)
  mean_dxhat_xhat = _each_channel(
      _sum_groups(k * sum_d_xhat, num_groups) / count, channels)
  p = inv_std_c * k
  q = -jnp.square(inv_std_c) * mean_dxhat_xhat
  r = inv_std_c * (inv_std_c * mean_dxhat_xhat * mean_c - mean_dxhat)
  dx = (d_a * _over_map(p, x.ndim) + x32 * _over_map(q, x.ndim)
        + _over_map(r, x.ndim))
  return dx.astype(x.dtype), d_scale, d_bias, d_film_scale, d_film_shift


group_norm_act.defvjp(_group_norm_act_fwd, _group_norm_act_bwd)


class GroupNorm(nnx.Module):
  """Group normalisation over the channel (last) axis of (B, ..., C) maps.

  The parameters (`scale`, `bias`, float32) and the result are those of
  `nnx.GroupNorm` with its default fast variance (E[x^2] - E[x]^2), to float32
  rounding. It is computed by `group_norm_act`, for speed on XLA:CPU: the
  statistics as sums over positions, then over group channels; the
  normalisation as one per-example, per-channel affine map, into which an
  optional FiLM `modulation` (scale, shift), each (B, C), and an optional
  SiLU fold; and a hand-written gradient. Statistics and the affine map run
  in float32 whatever `dtype` is; the result is cast to `dtype`.
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
      modulation: tuple[jax.Array, jax.Array] | None = None, *,
      silu: bool = False) -> jax.Array:
    """Normalised x; with `modulation=(s, t)`, normalised x * (1 + s) + t;
    with `silu`, SiLU of that."""
    if modulation is None:
      film_scale = film_shift = jnp.zeros((x.shape[0], x.shape[-1]), jnp.float32)
    else:
      film_scale, film_shift = (m.astype(jnp.float32) for m in modulation)
    return group_norm_act(x, self.scale[...], self.bias[...], film_scale,
                          film_shift, self.num_groups, self.epsilon, silu,
                          self.dtype)


# The most groups a model's GroupNorms have by default: Stable Diffusion's 32.
# At 32 channels or fewer that is one channel per group, an instance norm,
# which removes each image's mean and contrast of every channel: models that
# narrow should pass fewer (`norm_groups`).
DEFAULT_NORM_GROUPS = 32


def group_norm(channels: int, *, max_groups: int = DEFAULT_NORM_GROUPS, dtype=jnp.float32,
               rngs: nnx.Rngs) -> GroupNorm:
  return GroupNorm(channels, num_groups=num_groups_for(channels, max_groups),
                   epsilon=1e-6, dtype=dtype, rngs=rngs)


def _mix32(bits: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 in which every
  input bit flips about half of the output bits."""
  bits = (bits ^ (bits >> 16)) * jnp.uint32(0x85EBCA6B)
  bits = (bits ^ (bits >> 13)) * jnp.uint32(0xC2B2AE35)
  return bits ^ (bits >> 16)


def dropout_keep_mask(key: jax.Array, shape: tuple[int, ...],
                      rate: float) -> jax.Array:
  """Boolean mask of `shape`, each element True with probability 1 - rate.

  Each element's 32 random bits are a keyed hash of its flat index: the
  finaliser above, applied twice with two 32-bit words drawn from `key`
  mixed in. Elements are thus a function of (key, index) alone, the same
  however the array is sharded, and each costs a few integer operations:
  0.3 ms for a 64x16x16x128 mask on the 2-core CPU against 19 ms for
  `jax.random.bernoulli` (partitionable threefry), which made the dropout
  of the issue-8 UNet step cost more than PyTorch's (bench/README.md,
  round 17). Within one mask and across keys the bits pass as independent
  for dropout (tests/test_models.py); it is not a general-purpose RNG.
  """
  words = jax.random.bits(key, (2,), jnp.uint32)
  index = lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  bits = _mix32(_mix32(index + words[0]) ^ words[1])
  return bits >= jnp.uint32(min(round(rate * 2.0 ** 32), 2 ** 32 - 1))


class Dropout(nnx.Dropout):
  """`nnx.Dropout` (same state, switches and arguments) with its mask from
  `dropout_keep_mask` rather than `jax.random.bernoulli`."""

  def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None,
               rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None
               ) -> jax.Array:
    deterministic = (self.deterministic if deterministic is None
                     else deterministic)
    if deterministic is None:
      raise ValueError("Dropout needs `deterministic`: pass it, set it at "
                       "construction, or use nnx.view(model, deterministic=...)")
    if self.rate == 0.0 or deterministic:
      return inputs
    if self.rate == 1.0:  # No finite scale; and no NaN gradients.
      return jnp.zeros_like(inputs)
    rngs = self.rngs if rngs is None else rngs
    if rngs is None:
      raise ValueError("Dropout is not deterministic but has no rngs")
    if isinstance(rngs, nnx.Rngs):
      key = rngs[self.rng_collection]()
    elif isinstance(rngs, nnx.RngStream):
      key = rngs()
    else:
      key = rngs
    mask_shape = tuple(1 if axis in self.broadcast_dims else size
                       for axis, size in enumerate(inputs.shape))
    keep = jnp.broadcast_to(dropout_keep_mask(key, mask_shape, self.rate),
                            inputs.shape)
    return lax.select(keep, inputs / (1.0 - self.rate), jnp.zeros_like(inputs))


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
      norm_groups: int = DEFAULT_NORM_GROUPS,
      dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.norm1 = group_norm(in_channels, max_groups=norm_groups, dtype=dtype, rngs=rngs)
    self.conv1 = Conv(in_channels, out_channels, (3, 3), dtype=dtype, rngs=rngs)
    self.emb_proj = (
        nnx.Linear(emb_dim, 2 * out_channels, dtype=dtype, rngs=rngs)
        if emb_dim is not None else None)
    self.norm2 = group_norm(out_channels, max_groups=norm_groups, dtype=dtype, rngs=rngs)
    # `dropout=None` builds no Dropout at all (the VAE: no RNG stream in its
    # state). Any float, even 0.0, builds one, so that a denoiser always has
    # the `deterministic` switch that `nnx.view(model, deterministic=...)`
    # looks for, whatever its dropout rate.
    self.dropout = (
        Dropout(dropout, rngs=rngs) if dropout is not None else None)
    self.conv2 = Conv(out_channels, out_channels, (3, 3), dtype=dtype, rngs=rngs)
    self.skip = (
        Conv(in_channels, out_channels, (1, 1), dtype=dtype, rngs=rngs)
        if in_channels != out_channels else None)

  def __call__(self, x: jax.Array, emb: jax.Array | None = None) -> jax.Array:
    h = self.conv1(self.norm1(x, silu=True))
    modulation = None
    if self.emb_proj is not None:
      if emb is None:
        raise ValueError("this ResBlock was built with emb_dim; pass emb")
      modulation = tuple(
          jnp.split(self.emb_proj(jax.nn.silu(emb)), 2, axis=-1))
    h = self.norm2(h, modulation, silu=True)
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
    num_queries, num_tokens = queries.shape[1], context.shape[1]
    # Folding costs F*F per token per example and saves F*F per query, and
    # each query then needs H*Tk columns instead of F: worth it for a few
    # tokens attended by many queries (the class tokens), not in
    # self-attention, where queries and tokens are as many.
    if num_tokens < num_queries and self.num_heads * num_tokens < queries.shape[-1]:
      return self._through_few_tokens(queries, context)
    return self._direct(queries, context)

  def _direct(self, queries: jax.Array, context: jax.Array) -> jax.Array:
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

  def _through_few_tokens(self, queries: jax.Array, context: jax.Array) -> jax.Array:
    """The same attention, reassociated for a context of few tokens.

    With Tk context tokens and H heads, a query's logits are linear in the
    query row: x.(Wq_h k_hj) + bq_h.k_hj. So is the output: sum over h, j of
    p_hj (v_hj Wo_h). Folding the query and output projections into the
    keys and values of each example (H*Tk columns per example) replaces two
    F x F products per query position by two F x H*Tk ones, for two
    Tk x F x F products per example: for the UNet's class tokens (4 tokens,
    4 heads, F=256) at 8x8 positions, 8x fewer multiplies in this layer
    counting the folding, at 4x4 3.3x. The parameters are the same ones, so checkpoints do not
    change; only rounding differs from the direct form.
    """
    dtype = self.query.dtype or queries.dtype
    batch, _, features = queries.shape
    head_dim = features // self.num_heads

    def param(variable):
      return variable[...].astype(dtype)

    context_rows = as_rows(context).astype(dtype)
    # (B, Tk, H, d), each per example.
    keys = (context_rows @ param(self.key.kernel)).reshape(
        batch, -1, self.num_heads, head_dim)
    values = self.value(context_rows).reshape(batch, -1, self.num_heads, head_dim)
    query_kernel = param(self.query.kernel).reshape(features, self.num_heads, head_dim)
    scale = 1.0 / head_dim ** 0.5
    # Logit weights (B, F, H*Tk) and biases (B, 1, H*Tk), columns ordered
    # (head, token).
    logit_weights = jnp.einsum("fhd,bjhd->bfhj", query_kernel, keys * scale).reshape(
        batch, features, -1)
    logit_biases = jnp.einsum(
        "hd,bjhd->bhj", param(self.query.bias).reshape(self.num_heads, head_dim),
        keys * scale).reshape(batch, 1, -1)
    logits = jnp.matmul(queries.astype(dtype), logit_weights,
                        preferred_element_type=jnp.float32) + logit_biases
    logits = logits.reshape(logits.shape[:2] + (self.num_heads, -1))
    # Softmax over the tokens of each head, in float32 as for the direct form.
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype).reshape(logits.shape[:2] + (-1,))
    # Each token's value through its head's slice of the output projection:
    # (B, H*Tk, F), rows ordered (head, token) like the probabilities.
    out_kernel = param(self.out.kernel).reshape(self.num_heads, head_dim, features)
    projected_values = jnp.einsum("bjhd,hdf->bhjf", values, out_kernel).reshape(
        batch, -1, features)
    return probs @ projected_values + param(self.out.bias)


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
      norm_groups: int = DEFAULT_NORM_GROUPS,
      dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.norm = group_norm(channels, max_groups=norm_groups, dtype=dtype, rngs=rngs)
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
