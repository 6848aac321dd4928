"""Pictures: uint8 conversion, grids, the comparison picture, PNG files."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ldm_jax import files


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Images in [-1, 1] to uint8 in [0, 255], rounding to the nearest level."""
  images = np.asarray(images, dtype=np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid(images: np.ndarray, columns: int, *, padding: int = 2,
         background: int = 255) -> np.ndarray:
  """Tiles (N, H, W, C) uint8 images row by row into one (rows, columns) image."""
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"expected (N, H, W, C) images, got shape {images.shape}")
  count, height, width, channels = images.shape
  rows = max(1, -(-count // columns))
  canvas = np.full(
      (rows * (height + padding) + padding, columns * (width + padding) + padding, channels),
      background, dtype=np.uint8)
  for index, image in enumerate(images):
    top = padding + (index // columns) * (height + padding)
    left = padding + (index % columns) * (width + padding)
    canvas[top:top + height, left:left + width] = image
  return canvas


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour enlargement, so 32x32 images stay crisp when viewed."""
  return image.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else image


def comparison(originals: np.ndarray, reconstructions: np.ndarray, *,
               scale: int = 2) -> np.ndarray:
  """Originals in the top row, their reconstructions right below."""
  if originals.shape != reconstructions.shape:
    raise ValueError(
        f"originals {originals.shape} and reconstructions {reconstructions.shape} differ")
  both = np.concatenate([originals, reconstructions])
  return upscale(grid(both, columns=len(originals)), scale)


def labelled_rows(rows: Sequence[np.ndarray], labels: Sequence[str], *,
                  scale: int = 2, label_width: int = 120) -> np.ndarray:
  """One row of images per label, the label written at the left of its row."""
  if len(rows) != len(labels):
    raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
  columns = max(len(r) for r in rows)
  tiles = [upscale(grid(r, columns=columns), scale) for r in rows]
  height = sum(t.shape[0] for t in tiles)
  width = label_width + max(t.shape[1] for t in tiles)
  canvas = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default(size=14)
  top = 0
  for tile, label in zip(tiles, labels):
    canvas.paste(Image.fromarray(_rgb(tile)), (label_width, top))
    _, text_top, _, text_bottom = draw.textbbox((0, 0), label, font=font)
    draw.text((6, top + (tile.shape[0] - (text_bottom - text_top)) // 2 - text_top),
              label, fill="black", font=font)
    top += tile.shape[0]
  return np.asarray(canvas)


def _rgb(image: np.ndarray) -> np.ndarray:
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
  """Writes atomically: a reader never sees a half-written picture."""
  with files.atomic_write(path, "wb") as f:
    Image.fromarray(_rgb(np.asarray(image, dtype=np.uint8))).save(f, format="PNG")
