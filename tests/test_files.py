"""files.atomic_write: a file is replaced whole or not at all."""

import os

import pytest

from ldm_jax import files


def test_atomic_write_replaces_the_file_only_when_the_block_finishes(tmp_path):
  path = tmp_path / "sub" / "results.json"
  with files.atomic_write(path) as f:  # Creates the missing folder.
    f.write("old")
  with pytest.raises(RuntimeError):
    with files.atomic_write(path) as f:
      f.write("new, half written")
      f.flush()
      # Mid-write, readers still see the old file whole.
      assert path.read_text() == "old"
      raise RuntimeError("killed mid-write")
  assert path.read_text() == "old"
  assert os.listdir(path.parent) == ["results.json"]  # No partial file is left.
  with files.atomic_write(path, "wb") as f:
    f.write(b"new")
  assert path.read_bytes() == b"new" and os.listdir(path.parent) == ["results.json"]
