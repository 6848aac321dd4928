"""Pictures: value conversion, grid layout, atomic PNG output."""

import numpy as np
import pytest
from PIL import Image

from ldm_jax import images


def test_to_uint8_maps_the_signed_unit_range_and_clips():
  x = np.array([-1.5, -1.0, 0.0, 1.0, 2.0], np.float32)
  np.testing.assert_array_equal(images.to_uint8(x), [0, 0, 128, 255, 255])


def test_grid_places_each_image_row_by_row():
  tiles = np.stack([np.full((2, 3, 3), i * 10, np.uint8) for i in range(5)])
  canvas = images.grid(tiles, columns=3, padding=1, background=255)
  assert canvas.shape == (2 * 3 + 1, 3 * 4 + 1, 3)
  assert (canvas[1:3, 1:4] == 0).all()  # image 0 at row 0, column 0
  assert (canvas[1:3, 9:12] == 20).all()  # image 2 at row 0, column 2
  assert (canvas[4:6, 5:8] == 40).all()  # image 4 at row 1, column 1
  assert (canvas[4:6, 9:12] == 255).all()  # the unused cell stays background


def test_comparison_puts_originals_above_reconstructions():
  originals = np.zeros((4, 8, 8, 3), np.uint8)
  reconstructions = np.full((4, 8, 8, 3), 200, np.uint8)
  picture = images.comparison(originals, reconstructions, scale=1)
  top, bottom = picture[2:10], picture[12:20]
  assert (top[:, 2:10] == 0).all() and (bottom[:, 2:10] == 200).all()
  with pytest.raises(ValueError, match="differ"):
    images.comparison(originals, reconstructions[:3])


def test_labelled_rows_writes_one_row_per_label(tmp_path):
  rows = [np.full((3, 8, 8, 3), v, np.uint8) for v in (0, 128)]
  picture = images.labelled_rows(rows, ["apple", "bee"], scale=2, label_width=50)
  # Each row: 3 tiles of 8 px with 2 px padding, doubled: 24 x 64, after the labels.
  assert picture.shape == (2 * 24, 50 + 64, 3)
  assert (picture[2 * 2:10 * 2, 50 + 2 * 2:50 + 10 * 2] == 0).all()
  assert (picture[24 + 4:24 + 20, 50 + 4:50 + 20] == 128).all()
  left = picture[:, :50]
  assert (left < 128).any()  # the label text is drawn
  path = tmp_path / "sub" / "grid.png"
  images.save_png(path, picture)
  assert Image.open(path).size == (picture.shape[1], picture.shape[0])
  assert not list(tmp_path.glob("sub/*.partial*"))
  with pytest.raises(ValueError, match="2 rows but 1 labels"):
    images.labelled_rows(rows, ["apple"])
