"""Train and eval streams over the prepared dataset.

Sharding: the global batch is split evenly over processes; each process reads
only its own rows. For training that is a contiguous 1/process_count block of
the (hash-shuffled, so class-balanced) stored order. For evaluation, global
batch k is the stored rows [k * B, (k + 1) * B), and process p reads its
contiguous slice of it, so the global batch assembled by
`parallel.shard_batch` is in stored order on any number of processes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import grain
import jax
import ml_collections
import numpy as np
from tensorflow_datasets.proto import tf_example_pb2

from ldm_jax.data import augment
from ldm_jax.data.builder import open_split
from ldm_jax.data.sources import IMAGE_SHAPE

# Batches prefetched by grain's reader threads. Each float32 batch of 128 is
# 1.5 MB; the grain default (500) would hold ~750 MB for no gain.
_PREFETCH_BATCHES = 16
_READ_THREADS = 4
_READ_CHUNK = 4096


def _process_info(process_index: int | None,
                  process_count: int | None) -> tuple[int, int]:
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in "
                     f"[0, process_count={process_count})")
  return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a "
                     f"positive multiple of process_count={process_count}")
  return global_batch_size // process_count


def _stream_seeds(seed: int, process_index: int) -> tuple[int, int]:
  """Independent (shuffle, augmentation) seeds in grain's uint32 range.

  SeedSequence mixes its inputs, so nearby run seeds or process indices give
  unrelated streams, and shuffle and augmentation never share randomness.
  """
  shuffle_seed, augment_seed = np.random.SeedSequence(
      [seed, process_index]).generate_state(2, dtype=np.uint32)
  return int(shuffle_seed), int(augment_seed)


def read_examples(source, indices) -> tuple[np.ndarray, np.ndarray]:
  """Rows `indices` of a split as (uint8 NHWC images, int32 labels).

  This is the hot path of every stream. It reads the serialized records in
  one batched array_record call through the TFDS data source, then parses
  only the two features it needs straight from the tf.train.Example proto:
  about 30 us per image, against about 270 us for TFDS's generic per-record
  decoding (bench/bench_data.py), which also builds the unused id and coarse
  label. tests/test_data.py checks both decodings agree.
  """
  indices = [int(i) for i in indices]
  # array_record refuses an empty read, which the last eval batch can be.
  records = source.data_source.__getitems__(indices) if indices else []
  images = np.empty((len(records),) + IMAGE_SHAPE, np.uint8)
  labels = np.empty((len(records),), np.int32)
  for row, record in enumerate(records):
    feature = tf_example_pb2.Example.FromString(record).features.feature
    images[row] = np.frombuffer(
        feature["image"].bytes_list.value[0], np.uint8).reshape(IMAGE_SHAPE)
    labels[row] = feature["label"].int64_list.value[0]
  return images, labels


def _read_batch(source, indices: np.ndarray) -> dict[str, np.ndarray]:
  images, labels = read_examples(source, indices)
  return {"image": images, "label": labels}


def train_iterator(data_config: ml_collections.ConfigDict,
                   global_batch_size: int, seed: int, *,
                   process_index: int | None = None,
                   process_count: int | None = None) -> grain.DatasetIterator:
  """The infinite, augmented, checkpointable train stream of this process.

  Each epoch visits this process's shard once in a new order (deterministic
  given `seed`). Batches are cut from the repeated stream, so one may span an
  epoch boundary and every batch is full.

  Returns:
    A grain iterator of ``{image: float32 (B, 32, 32, 3) in [-1, 1],
    label: int32 (B,)}`` with B = global_batch_size // process_count. Its
    get_state()/set_state() (or grain.checkpoint.CheckpointSave/Restore with
    orbax) resume the exact same stream.
  """
  process_index, process_count = _process_info(process_index, process_count)
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  source = open_split(data_config, "train")
  num_examples = len(source)
  start = process_index * num_examples // process_count
  stop = (process_index + 1) * num_examples // process_count
  if stop - start < local_batch_size:
    raise ValueError(f"the per-process shard ({stop - start} examples) is "
                     f"smaller than one batch ({local_batch_size})")
  shuffle_seed, augment_seed = _stream_seeds(seed, process_index)
  transform = functools.partial(
      augment.augment_batch, random_flip=data_config.random_flip,
      crop_padding=data_config.crop_padding)
  # Shuffle and batch row indices, then read each batch in one call: batched
  # reads are several times cheaper than one record at a time.
  dataset = (
      grain.MapDataset.range(start, stop)
      .shuffle(seed=shuffle_seed)
      .repeat()  # reseeds the shuffle each epoch: a new order every epoch.
      .batch(local_batch_size, drop_remainder=True)
      .map(functools.partial(_read_batch, source))
      # random_map draws the generator from (augment_seed, batch index).
      .random_map(transform, seed=augment_seed)
      .to_iter_dataset(grain.ReadOptions(
          num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES)))
  if data_config.worker_count > 0:
    dataset = dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=data_config.worker_count))
  return iter(dataset)


def _num_examples(source, split: str, num_examples: int | None) -> int:
  if num_examples is None:
    return len(source)
  if not 0 < num_examples <= len(source):
    raise ValueError(f"num_examples={num_examples} must be in "
                     f"[1, {len(source)}] for the {split} split")
  return num_examples


def eval_batches(data_config: ml_collections.ConfigDict,
                 global_batch_size: int, *, split: str = "test",
                 process_index: int | None = None,
                 process_count: int | None = None,
                 num_examples: int | None = None) -> Iterator[dict]:
  """One in-order pass over a split, unaugmented, in equal-sized batches.

  Every process yields the same number of batches of exactly
  ``global_batch_size // process_count`` rows; rows past the end of the split
  are zeros with ``mask`` 0, so batches always split evenly over devices and
  metrics must be weighted by ``mask``.

  Yields:
    ``{image: float32 [-1, 1], label: int32, mask: float32}``.
  """
  process_index, process_count = _process_info(process_index, process_count)
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  source = open_split(data_config, split)
  total = _num_examples(source, split, num_examples)
  num_batches = -(-total // global_batch_size)
  return _eval_generator(source, total, num_batches, global_batch_size,
                         local_batch_size, process_index)


def _eval_generator(source, total: int, num_batches: int,
                    global_batch_size: int, local_batch_size: int,
                    process_index: int) -> Iterator[dict]:
  # A separate generator so that eval_batches checks its arguments eagerly.
  for batch_index in range(num_batches):
    start = batch_index * global_batch_size + process_index * local_batch_size
    stop = min(start + local_batch_size, total)
    images, labels = read_examples(source, range(min(start, total), stop))
    num_real = len(labels)
    padding = local_batch_size - num_real
    mask = np.zeros(local_batch_size, np.float32)
    mask[:num_real] = 1.0
    yield {
        "image": np.concatenate([
            augment.to_signed_unit_range(images),
            np.zeros((padding,) + images.shape[1:], np.float32)]),
        "label": np.concatenate([labels, np.zeros(padding, np.int32)]),
        "mask": mask,
    }


def load_split_images(data_config: ml_collections.ConfigDict, split: str,
                      num_examples: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
  """The first `num_examples` (default all) of a split, in stored order.

  Returns:
    (uint8 images (N, 32, 32, 3), int32 labels (N,)), e.g. for FID reference
    statistics. Reads in large batched chunks.
  """
  source = open_split(data_config, split)
  total = _num_examples(source, split, num_examples)
  images = np.empty((total,) + IMAGE_SHAPE, np.uint8)
  labels = np.empty((total,), np.int32)
  for start in range(0, total, _READ_CHUNK):
    stop = min(start + _READ_CHUNK, total)
    images[start:stop], labels[start:stop] = read_examples(
        source, range(start, stop))
  return images, labels
