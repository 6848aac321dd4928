"""The TFDS dataset ``cifar100_ldm``: how it is written and how it is found.

The builder is not registered with TFDS (``skip_registration``), so it can never
clash with TFDS's own ``cifar100``; reading goes through `tfds.data_source`,
which finds an unregistered dataset from the files in ``data_dir`` alone.

Features match TFDS ``cifar100`` (id, image, label, coarse_label) except that
the image is stored as raw bytes (``Tensor(uint8, encoding=BYTES)``) instead of
PNG: reading then skips a PNG decode per image, which costs more than the
whole rest of the record parsing (see bench/bench_data.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils

from ldm_jax.data import sources
from ldm_jax.data.sources import DataError

DATASET_NAME = "cifar100_ldm"
DATASET_VERSION = "1.0.0"
SUPPORTED_NAMES = ("cifar100",)
ARRAY_RECORD = "array_record"


def default_data_config() -> ml_collections.ConfigDict:
  """The data section every config starts from (``config.data``)."""
  return ml_collections.ConfigDict({
      "name": "cifar100",
      # None: the TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR).
      "data_dir": ml_collections.config_dict.placeholder(str),
      # Where prepare-on-first-use reads from: a path, or None to download.
      "source": ml_collections.config_dict.placeholder(str),
      "image_size": 32,
      "num_classes": 100,
      "random_flip": True,
      "crop_padding": 4,
      # Grain worker processes for the train stream; 0 reads in-process.
      "worker_count": 0,
  })


class Cifar100Ldm(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """CIFAR-100 with fine and coarse labels, from an already validated source."""

  name = DATASET_NAME
  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {
      DATASET_VERSION: "Raw uint8 images; official train/test splits."}

  def __init__(self, *, data: sources.Cifar100 | None = None, **kwargs):
    # `data` is only needed to write the dataset; a builder made to check
    # whether the dataset exists has none.
    self._source_data = data
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    data = self._source_data
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "CIFAR-100: 60,000 32x32 colour images in 100 fine classes "
            "grouped into 20 coarse classes; official 50,000 / 10,000 "
            "train/test split. Images stored as raw uint8 tensors."),
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "image": tfds.features.Tensor(
                shape=sources.IMAGE_SHAPE, dtype=np.uint8,
                encoding=tfds.features.Encoding.BYTES),
            "label": _class_label(sources.NUM_CLASSES,
                                  data and data.label_names),
            "coarse_label": _class_label(sources.NUM_COARSE_CLASSES,
                                         data and data.coarse_label_names),
        }),
        supervised_keys=("image", "label"),
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        citation=(
            "@TECHREPORT{Krizhevsky09learningmultiple, author = {Alex "
            "Krizhevsky}, title = {Learning multiple layers of features from "
            "tiny images}, institution = {}, year = {2009}}"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The source was read (and validated) before writing.
    if self._source_data is None:
      raise DataError("Cifar100Ldm needs `data=` to write the dataset")
    return {name: self._generate_examples(name, split)
            for name, split in self._source_data.splits.items()}

  def _generate_examples(self, split_name: str, split: sources.Split):
    # Keys are source positions; TFDS shuffles records by a hash of the key,
    # which breaks up the class-sorted order of some sources.
    for index in range(len(split.labels)):
      yield index, {
          "id": f"{split_name}_{index:05d}",
          "image": split.images[index],
          "label": int(split.labels[index]),
          "coarse_label": int(split.coarse_labels[index]),
      }


def _class_label(num_classes: int, names: list[str] | None):
  if names:
    return tfds.features.ClassLabel(names=names)
  return tfds.features.ClassLabel(num_classes=num_classes)


def _check_name(data_config: ml_collections.ConfigDict) -> None:
  if data_config.name not in SUPPORTED_NAMES:
    raise ValueError(f"data.name={data_config.name!r} is not supported; "
                     f"choose one of {SUPPORTED_NAMES}")


def _data_root(data_dir: str | None) -> str:
  return os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)


def dataset_dir(data_dir: str | None) -> str:
  """Where the prepared dataset lives (``DATA_DIR/cifar100_ldm/VERSION``)."""
  return os.path.join(_data_root(data_dir), DATASET_NAME, DATASET_VERSION)


def is_prepared(data_dir: str | None) -> bool:
  """Whether a complete dataset is in `data_dir`.

  TFDS writes into a temporary directory and renames it into place only after
  every file, dataset_info.json last, is written; this is the test TFDS itself
  applies, minus its warning when the directory does not exist.
  """
  return os.path.isfile(os.path.join(dataset_dir(data_dir),
                                     "dataset_info.json"))


def prepare_command(data_dir: str | None, source: str | None) -> str:
  """The shell command that prepares the dataset, for error messages."""
  return (f"python -m ldm_jax.data prepare --data_dir={_data_root(data_dir)} "
          f"--from={source or 'DIR_WITH_CIFAR100_SOURCE'}")


def prepare(data_dir: str | None, source: str | None = None, *,
            expected_sizes: Mapping[str, int] | None = None) -> None:
  """Writes the TFDS dataset into `data_dir` unless it is already there.

  Args:
    data_dir: TFDS data directory (None: the TFDS default).
    source: an official archive, a directory holding one, or a directory of
      numpy shards; None downloads the official python archive into
      ``data_dir/downloads`` (verified by checksum).
    expected_sizes: examples per split, default 50,000 / 10,000.

  Raises:
    DataError: the source is missing or bad. Nothing is left that a later run
      would take for a prepared dataset.
  """
  root = _data_root(data_dir)
  if is_prepared(root):
    logging.info("%s already prepared in %s", DATASET_NAME, dataset_dir(root))
    return
  download_dir = os.path.join(root, "downloads")
  if source is None:
    logging.info("downloading %s", sources.DOWNLOAD_URL)
    source = sources.download_archive(download_dir)
  logging.info("reading %s", source)
  data = sources.read_source(source)
  sources.validate(data, expected_sizes)
  builder = Cifar100Ldm(data=data, data_dir=root, file_format=ARRAY_RECORD)
  builder.download_and_prepare(download_dir=download_dir)
  logging.info("wrote %s to %s", DATASET_NAME, builder.data_dir)


def ensure_prepared(data_config: ml_collections.ConfigDict) -> None:
  """Prepares the dataset from ``data_config.source`` if it is not there yet.

  With several processes, process 0 prepares first and the others wait, then
  any process whose ``data_dir`` is still empty (a host-local disk) prepares
  its own copy.

  Raises:
    DataError: it could not be prepared; the message gives the command that
      prepares it by hand.
  """
  _check_name(data_config)
  data_dir, source = data_config.data_dir, data_config.source

  def prepare_here():
    if is_prepared(data_dir):
      return
    try:
      prepare(data_dir, source)
    except DataError as e:
      raise DataError(
          f"CIFAR-100 is not prepared in {dataset_dir(data_dir)} and could "
          f"not be prepared automatically: {e}\nPrepare it with:\n  "
          f"{prepare_command(data_dir, source)}") from e

  if jax.process_count() == 1:
    prepare_here()
    return
  # Process 0 reaches the barrier even when it fails, so that no process
  # hangs there; the others then fail with the same clear error themselves.
  failure = None
  if jax.process_index() == 0:
    try:
      prepare_here()
    except DataError as e:
      failure = e
  multihost_utils.sync_global_devices("ldm_jax.data.ensure_prepared")
  if failure is not None:
    raise failure
  prepare_here()


def open_split(data_config: ml_collections.ConfigDict, split: str):
  """The random-access TFDS data source of one prepared split."""
  _check_name(data_config)
  if split not in sources.SPLITS:
    raise ValueError(f"unknown split {split!r}; choose one of {sources.SPLITS}")
  if not is_prepared(data_config.data_dir):
    raise DataError(
        f"CIFAR-100 is not prepared in {dataset_dir(data_config.data_dir)}; "
        f"call ensure_prepared(config.data) or run:\n  "
        f"{prepare_command(data_config.data_dir, data_config.source)}")
  return tfds.data_source(DATASET_NAME, split=split,
                          data_dir=_data_root(data_config.data_dir),
                          download=False)


def class_names(data_config: ml_collections.ConfigDict) -> list[str]:
  """The 100 fine label names, index = label."""
  source = open_split(data_config, "test")
  return list(source.dataset_info.features["label"].names)
