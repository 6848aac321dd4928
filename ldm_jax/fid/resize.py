"""Bilinear resizing with PyTorch's `F.interpolate` semantics.

FID is only comparable across implementations if the Inception network sees
the same pixels. The reference protocol (pytorch-fid) upsamples with
`F.interpolate(mode="bilinear", align_corners=False)` and no antialiasing,
which differs from `jax.image.resize` at the borders (PyTorch clamps the
source coordinate at 0 instead of extrapolating) and, for downsampling, in
having no antialias filter. So the resize is written out explicitly here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=32)
def _linear_taps(in_size: int, out_size: int):
  """Source indices and weights of each output row, as PyTorch computes them.

  PyTorch works in float32 for float32 images: the scale is in/out, the
  source coordinate is (dst + 0.5) * scale - 0.5 clamped below at 0, and the
  upper neighbour is clamped to the last row.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5),
                   np.float32(0.0))
  lower = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  upper = np.minimum(lower + 1, in_size - 1)
  upper_weight = np.clip(src - lower.astype(np.float32), 0.0, 1.0)
  lower_weight = np.float32(1.0) - upper_weight
  return lower, upper, lower_weight, upper_weight.astype(np.float32)


def _resize_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
  lower, upper, lower_weight, upper_weight = _linear_taps(x.shape[axis],
                                                          out_size)
  # Weights broadcast along `axis` only.
  weight_shape = [1] * x.ndim
  weight_shape[axis] = out_size
  lower_weight = jnp.asarray(lower_weight).reshape(weight_shape)
  upper_weight = jnp.asarray(upper_weight).reshape(weight_shape)
  return (jnp.take(x, lower, axis=axis) * lower_weight
          + jnp.take(x, upper, axis=axis) * upper_weight)


def resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Resizes NHWC float images like `F.interpolate(..., mode="bilinear")`.

  Args:
    images: (N, H, W, C) floating point array.
    size: output (height, width).

  Returns:
    (N, size[0], size[1], C) array of the input dtype, equal to PyTorch's
    `F.interpolate(x, size, mode="bilinear", align_corners=False)` (no
    antialias) up to float rounding.
  """
  if images.ndim != 4:
    raise ValueError(f"expected NHWC images, got shape {images.shape}")
  out_height, out_width = size
  resized = _resize_axis(images, 1, out_height)
  return _resize_axis(resized, 2, out_width)
