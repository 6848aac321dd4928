"""The FID Inception-v3 network in Flax NNX.

This is the TensorFlow "inception-2015-12-05" graph that TTUR's original FID
code ran, in the form pytorch-fid and NVIDIA's TorchScript port reproduce. It
differs from the usual Inception-v3 (e.g. torchvision's) in three ways that
all change the features, so all three are kept:

* batch norm has no scale (the TF graph has only beta), eps 1e-3, and runs on
  its stored statistics;
* the average pools in the mixed blocks ignore padded zeros
  (`count_include_pad=False`), as TF's "SAME" average pool does;
* the last mixed block (Mixed_7c) pools its pool branch with a max pool.

Layer names are torchvision's / pytorch-fid's, lower-cased
(`Mixed_5b.branch1x1` -> `mixed_5b.branch1x1`), so a weight file maps onto the
module by name. Images are NHWC.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ldm_jax.fid.resize import resize_bilinear
from ldm_jax.kernels import conv as conv_kernels

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPSILON = 1e-3


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(value, int):
    return value, value
  first, second = value
  return first, second


class ConvBN(nnx.Module):
  """Conv without bias, batch norm without scale (inference), then ReLU.

  With `folded=True` the batch norm is gone and the conv has a bias instead:
  the inference batch norm is an affine map per output channel, so it folds
  exactly into the conv's kernel and bias (`weights.fold_batch_norm`), which
  saves a pass over every activation. The unfolded form is the layout of the
  weight files.
  """

  def __init__(self, in_features: int, out_features: int,
               kernel_size: int | Sequence[int], *, strides: int = 1,
               padding: int | Sequence[int] = 0,
               precision: jax.lax.Precision | None, folded: bool = False,
               rngs: nnx.Rngs):
    pad_h, pad_w = _pair(padding)
    self.conv = nnx.Conv(
        in_features, out_features, _pair(kernel_size), strides=strides,
        padding=((pad_h, pad_h), (pad_w, pad_w)), use_bias=folded,
        precision=precision, rngs=rngs,
        # float32 CPU convolutions on oneDNN (exact float32 arithmetic, as
        # Precision.HIGHEST asks); XLA's elsewhere. ldm_jax/kernels/conv.py.
        conv_general_dilated=conv_kernels.conv_general_dilated)
    self.bn = None if folded else nnx.BatchNorm(
        out_features, use_running_average=True, use_scale=False,
        epsilon=BN_EPSILON, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(x)
    return nnx.relu(x if self.bn is None else self.bn(x))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # TF's SAME average pool divides by the number of real (unpadded) pixels.
  return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                      count_include_pad=False)


def _max_pool_3x3(x: jax.Array) -> jax.Array:
  # Padding is -inf here, so border maxima only see real pixels (like torch).
  return nnx.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
  return nnx.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nnx.Module):
  """Mixed_5b/5c/5d: 1x1, 5x5, double 3x3 and average-pool branches."""

  def __init__(self, in_features: int, pool_features: int, *, precision,
               folded: bool, rngs: nnx.Rngs):
    conv = lambda *args, **kw: ConvBN(*args, precision=precision,
                                      folded=folded, rngs=rngs, **kw)
    self.branch1x1 = conv(in_features, 64, 1)
    self.branch5x5_1 = conv(in_features, 48, 1)
    self.branch5x5_2 = conv(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = conv(in_features, 64, 1)
    self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
    self.branch_pool = conv(in_features, pool_features, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
    branch3x3dbl = self.branch3x3dbl_3(
        self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    branch_pool = self.branch_pool(_avg_pool_3x3(x))
    return jnp.concatenate(
        [self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nnx.Module):
  """Mixed_6a: grid reduction 35x35 -> 17x17."""

  def __init__(self, in_features: int, *, precision, folded: bool,
               rngs: nnx.Rngs):
    conv = lambda *args, **kw: ConvBN(*args, precision=precision,
                                      folded=folded, rngs=rngs, **kw)
    self.branch3x3 = conv(in_features, 384, 3, strides=2)
    self.branch3x3dbl_1 = conv(in_features, 64, 1)
    self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = conv(96, 96, 3, strides=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    branch3x3dbl = self.branch3x3dbl_3(
        self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate(
        [self.branch3x3(x), branch3x3dbl, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nnx.Module):
  """Mixed_6b..6e: factorised 7x7 branches."""

  def __init__(self, in_features: int, channels_7x7: int, *, precision,
               folded: bool, rngs: nnx.Rngs):
    conv = lambda *args, **kw: ConvBN(*args, precision=precision,
                                      folded=folded, rngs=rngs, **kw)
    c7 = channels_7x7
    self.branch1x1 = conv(in_features, 192, 1)
    self.branch7x7_1 = conv(in_features, c7, 1)
    self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = conv(in_features, c7, 1)
    self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = conv(in_features, 192, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    branch7x7dbl = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2,
                  self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
      branch7x7dbl = layer(branch7x7dbl)
    branch_pool = self.branch_pool(_avg_pool_3x3(x))
    return jnp.concatenate(
        [self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nnx.Module):
  """Mixed_7a: grid reduction 17x17 -> 8x8."""

  def __init__(self, in_features: int, *, precision, folded: bool,
               rngs: nnx.Rngs):
    conv = lambda *args, **kw: ConvBN(*args, precision=precision,
                                      folded=folded, rngs=rngs, **kw)
    self.branch3x3_1 = conv(in_features, 192, 1)
    self.branch3x3_2 = conv(192, 320, 3, strides=2)
    self.branch7x7x3_1 = conv(in_features, 192, 1)
    self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = conv(192, 192, 3, strides=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
    branch7x7x3 = x
    for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3,
                  self.branch7x7x3_4):
      branch7x7x3 = layer(branch7x7x3)
    return jnp.concatenate(
        [branch3x3, branch7x7x3, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nnx.Module):
  """Mixed_7b/7c: expanded filter banks; `pool` picks the pool branch."""

  def __init__(self, in_features: int, *, pool: str, precision,
               folded: bool, rngs: nnx.Rngs):
    if pool not in ("avg", "max"):
      raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
    conv = lambda *args, **kw: ConvBN(*args, precision=precision,
                                      folded=folded, rngs=rngs, **kw)
    self.pool = pool
    self.branch1x1 = conv(in_features, 320, 1)
    self.branch3x3_1 = conv(in_features, 384, 1)
    self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = conv(in_features, 448, 1)
    self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = conv(in_features, 192, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    branch3x3 = self.branch3x3_1(x)
    branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3(x)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3),
        self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl),
        self.branch_pool(pooled),
    ], axis=-1)


class FIDInceptionV3(nnx.Module):
  """Inception-v3 up to the 2048-d pool3 features used by FID.

  Attributes keep torchvision's names in lower case. The 1008-way classifier
  of the TF graph is not part of this module: FID never uses it.
  """

  def __init__(self, *, precision: jax.lax.Precision | None = (
      jax.lax.Precision.HIGHEST), folded: bool = False, rngs: nnx.Rngs):
    # HIGHEST keeps float32 convolutions in float32 on GPUs/TPUs, where the
    # default may be TF32/bf16 passes that move features by ~1e-3 relative,
    # enough to shift FID in the first decimal.
    kw = dict(precision=precision, folded=folded, rngs=rngs)
    self.conv2d_1a_3x3 = ConvBN(3, 32, 3, strides=2, **kw)
    self.conv2d_2a_3x3 = ConvBN(32, 32, 3, **kw)
    self.conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1, **kw)
    self.conv2d_3b_1x1 = ConvBN(64, 80, 1, **kw)
    self.conv2d_4a_3x3 = ConvBN(80, 192, 3, **kw)
    self.mixed_5b = InceptionA(192, pool_features=32, **kw)
    self.mixed_5c = InceptionA(256, pool_features=64, **kw)
    self.mixed_5d = InceptionA(288, pool_features=64, **kw)
    self.mixed_6a = InceptionB(288, **kw)
    self.mixed_6b = InceptionC(768, channels_7x7=128, **kw)
    self.mixed_6c = InceptionC(768, channels_7x7=160, **kw)
    self.mixed_6d = InceptionC(768, channels_7x7=160, **kw)
    self.mixed_6e = InceptionC(768, channels_7x7=192, **kw)
    self.mixed_7a = InceptionD(768, **kw)
    self.mixed_7b = InceptionE(1280, pool="avg", **kw)
    self.mixed_7c = InceptionE(2048, pool="max", **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """(N, 299, 299, 3) images in [-1, 1] -> (N, 2048) pool3 features."""
    x = self.conv2d_2b_3x3(self.conv2d_2a_3x3(self.conv2d_1a_3x3(x)))
    x = _max_pool_3x3_stride2(x)
    x = self.conv2d_4a_3x3(self.conv2d_3b_1x1(x))
    x = _max_pool_3x3_stride2(x)
    for block in (self.mixed_5b, self.mixed_5c, self.mixed_5d, self.mixed_6a,
                  self.mixed_6b, self.mixed_6c, self.mixed_6d, self.mixed_6e,
                  self.mixed_7a, self.mixed_7b, self.mixed_7c):
      x = block(x)
    # pool3: the mean over the final 8x8 grid.
    return jnp.mean(x, axis=(1, 2))


def preprocess(images_uint8: jax.Array) -> jax.Array:
  """uint8 NHWC RGB -> the network's input, following pytorch-fid exactly.

  [0, 255] -> [0, 1] -> bilinear resize to 299x299 (F.interpolate semantics,
  no antialias) -> [-1, 1] by 2x - 1. The order matters for bit-level parity:
  pytorch-fid resizes in [0, 1].
  """
  x = images_uint8.astype(jnp.float32) / 255.0
  x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
  return 2.0 * x - 1.0


@functools.lru_cache(maxsize=4)
def _abstract_split(precision: jax.lax.Precision | None, folded: bool
                    ) -> tuple[nnx.GraphDef, nnx.State]:
  abstract = nnx.eval_shape(
      lambda: FIDInceptionV3(precision=precision, folded=folded,
                             rngs=nnx.Rngs(0)))
  return nnx.split(abstract)


def abstract_network(precision: jax.lax.Precision | None = (
    jax.lax.Precision.HIGHEST), folded: bool = False
                     ) -> tuple[nnx.GraphDef, nnx.State]:
  """The network's graph and shape-only state, to be filled from weights.

  `folded=False` is the layout of the weight files (conv + batch norm),
  `folded=True` the one that runs (conv with bias). Avoids initialising ~22M
  random parameters that would be thrown away; tracing the constructor still
  takes seconds, so the result is cached and a fresh copy of the state is
  returned each time (callers fill it in).
  """
  graphdef, state = _abstract_split(precision, folded)
  return graphdef, jax.tree.map(lambda leaf: leaf, state)
