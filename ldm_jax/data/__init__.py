"""CIFAR-100 for ldm-jax: prepare once into TFDS array_record, then stream.

Typical use::

  data.ensure_prepared(config.data)
  train = data.train_iterator(config.data, global_batch_size, seed)
  for batch in data.eval_batches(config.data, global_batch_size): ...
"""

from __future__ import annotations

from ldm_jax.data.builder import (
    DATASET_NAME,
    class_names,
    default_data_config,
    ensure_prepared,
    prepare,
)
from ldm_jax.data.pipeline import (
    eval_batches,
    load_split_images,
    train_iterator,
)
from ldm_jax.data.sources import DataError

__all__ = [
    "DATASET_NAME",
    "DataError",
    "class_names",
    "default_data_config",
    "ensure_prepared",
    "eval_batches",
    "load_split_images",
    "prepare",
    "train_iterator",
]
