"""Command line: prepares the dataset.

  python -m ldm_jax.data prepare --data_dir=DIR [--from=PATH]

Runs under absl.app so flags are parsed before anything else, which grain's
worker processes rely on.
"""

from __future__ import annotations

import os

from absl import app, flags

from ldm_jax import cli
from ldm_jax.data import builder
from ldm_jax.data.sources import OFFICIAL_SPLIT_SIZES, DataError

_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data directory to write into (default: the TFDS "
    "default, ~/tensorflow_datasets or $TFDS_DATA_DIR).")
_FROM = flags.DEFINE_string(
    "from", None, "An official cifar-100-{python,binary}.tar.gz, a directory "
    "holding one, or a directory of cifar100_*.npz shards. Omitted: download "
    "the official python archive (checksum verified).")
_TRAIN_SIZE = flags.DEFINE_integer(
    "train_size", OFFICIAL_SPLIT_SIZES["train"],
    "Expected train examples; change only for small test datasets.")
_TEST_SIZE = flags.DEFINE_integer(
    "test_size", OFFICIAL_SPLIT_SIZES["test"],
    "Expected test examples; change only for small test datasets.")

_USAGE = "usage: python -m ldm_jax.data prepare --data_dir=DIR [--from=PATH]"


def main(argv: list[str]) -> None:
  if argv[1:] != ["prepare"]:
    raise app.UsageError(_USAGE)
  data_dir = _DATA_DIR.value
  if data_dir and os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise DataError(f"--data_dir {data_dir} is a file; it must be a directory (new or "
                    "a TFDS data dir)")
  for name, size in (("--train_size", _TRAIN_SIZE.value), ("--test_size", _TEST_SIZE.value)):
    if size <= 0:
      raise DataError(f"{name} must be positive, got {size}")
  # A bad source is an error naming the file (cli: one line, exit status 2),
  # and nothing is written before the source has been read and checked.
  builder.prepare(data_dir, _FROM.value,
                  expected_sizes={"train": _TRAIN_SIZE.value, "test": _TEST_SIZE.value})
  print(f"prepared {builder.DATASET_NAME} in {builder.dataset_dir(data_dir)}")


if __name__ == "__main__":
  cli.run(main)
