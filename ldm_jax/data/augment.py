"""Batch-level image augmentation in numpy, vectorised over the batch.

`augment_batch` draws all of a batch's random numbers from one
`np.random.Generator`, so a batch's augmentation is fixed by the generator
alone: grain hands the train pipeline a generator seeded by (seed, batch
index), which makes a resumed run see exactly the batches it would have seen.
The pixel work is in `crop_and_flip`, a deterministic function of explicit
offsets and flip flags.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def crop_and_flip(images: np.ndarray, top: np.ndarray, left: np.ndarray,
                  flip: np.ndarray, padding: int) -> np.ndarray:
  """Zero-pads each side by `padding`, crops back to the input size, mirrors.

  Image b becomes ``padded[b, top[b]:top[b] + H, left[b]:left[b] + W]``,
  mirrored left-right where ``flip[b]``.

  Args:
    images: uint8 (B, H, W, C).
    top, left: int (B,) crop offsets in [0, 2 * padding].
    flip: bool (B,).
    padding: zero border added on every side before cropping.

  Returns:
    (B, H, W, C) array of the input dtype (a transposed view of a
    channel-major buffer; the float conversion that follows makes it
    contiguous).
  """
  batch, height, width, channels = images.shape
  padded = np.zeros((batch, height + 2 * padding, width + 2 * padding,
                     channels), images.dtype)
  padded[:, padding:padding + height, padding:padding + width] = images
  # All crop windows as a zero-copy view (B, rows, cols, C, H, W); picking
  # one window per image is then a single gather. Working channel-major keeps
  # the mirror a reversal of the contiguous last axis, which numpy copies
  # several times faster than reversing the middle axis of NHWC.
  windows = sliding_window_view(padded, (height, width), axis=(1, 2))
  crops = windows[np.arange(batch), top, left]  # (B, C, H, W), a copy.
  crops[flip] = crops[flip, :, :, ::-1]
  return crops.transpose(0, 2, 3, 1)


def to_signed_unit_range(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]; 0 and 255 map exactly to -1 and 1."""
  return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def augment_batch(batch: dict[str, np.ndarray], rng: np.random.Generator, *,
                  random_flip: bool = True,
                  crop_padding: int = 4) -> dict[str, np.ndarray]:
  """The train-time transform of one batch of ``{image: uint8, label}``.

  Random horizontal flip with probability 1/2 and a random crop after zero
  padding, as torchvision's ``RandomHorizontalFlip()`` and
  ``RandomCrop(32, padding=4)``; every offset in [0, 2 * crop_padding] is
  equally likely on both axes.

  Returns:
    ``{image: float32 in [-1, 1], label: int32}``.
  """
  images = batch["image"]
  size = images.shape[0]
  flip = rng.random(size) < 0.5 if random_flip else np.zeros(size, bool)
  top = rng.integers(0, 2 * crop_padding + 1, size=size)
  left = rng.integers(0, 2 * crop_padding + 1, size=size)
  images = crop_and_flip(images, top, left, flip, crop_padding)
  return {"image": to_signed_unit_range(images),
          "label": np.asarray(batch["label"], np.int32)}
