"""Train and eval streams over the prepared dataset.

Sharding: every stream is defined globally, by the seed and the global batch
size alone, and process p of P reads only rows [p * B / P, (p + 1) * B / P)
of each global batch of B. `parallel.shard_batch` puts those rows on the
process's devices, so the assembled global batch, and with it the whole run,
is the same on any number of processes. For training the global stream is an
epoch-wise shuffle of the split (each epoch visits every example once, over
all processes together); for evaluation global batch k is the stored rows
[k * B, (k + 1) * B).
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


def _stream_seeds(seed: int) -> tuple[int, int]:
  """Independent (shuffle, augmentation) seeds in grain's uint32 range.

  SeedSequence mixes its input, so nearby run seeds give unrelated streams,
  and shuffle and augmentation never share randomness. No process index goes
  in: every process walks the same global stream.
  """
  shuffle_seed, augment_seed = np.random.SeedSequence(
      [seed]).generate_state(2, dtype=np.uint32)
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
  return {"image": images, "label": labels, "index": np.asarray(indices, np.int32)}


def _take_rows(indices: np.ndarray, rows: slice) -> np.ndarray:
  return indices[rows]


def _augment_rows(batch: dict[str, np.ndarray], rng: np.random.Generator, *,
                  rows: slice, global_batch_size: int, random_flip: bool,
                  crop_padding: int) -> dict[str, np.ndarray]:
  """`augment.augment_batch` of the global batch, restricted to `rows`.

  The generator draws the random numbers of the whole global batch (a few
  hundred integers), so an image gets the same crop and flip whichever
  process reads it; only this process's rows are then touched.
  """
  # Drawn exactly as augment_batch draws for a batch of the global size.
  flip = rng.random(global_batch_size) < 0.5 if random_flip else np.zeros(
      global_batch_size, bool)
  top = rng.integers(0, 2 * crop_padding + 1, size=global_batch_size)
  left = rng.integers(0, 2 * crop_padding + 1, size=global_batch_size)
  images = augment.crop_and_flip(batch["image"], top[rows], left[rows], flip[rows],
                                 crop_padding)
  # Which stored image and which orientation each row is: what a latent
  # cache (stages/ldm.py) looks rows up by.
  return {"image": augment.to_signed_unit_range(images),
          "label": np.asarray(batch["label"], np.int32),
          "index": batch["index"], "flip": flip[rows].astype(np.int32)}


def train_iterator(data_config: ml_collections.ConfigDict,
                   global_batch_size: int, seed: int, *,
                   process_index: int | None = None,
                   process_count: int | None = None) -> grain.DatasetIterator:
  """This process's part of the infinite, augmented, checkpointable train stream.

  The global stream visits the split once per epoch in a new order
  (deterministic given `seed`) and is cut into global batches, so a batch may
  span an epoch boundary and every batch is full. This process reads its
  contiguous slice of each global batch; the union over processes is the
  global batch, whatever the number of processes.

  Returns:
    A grain iterator of ``{image: float32 (B, 32, 32, 3) in [-1, 1],
    label: int32 (B,), index: int32 (B,) row of the split, flip: int32 (B,)
    1 where mirrored}`` with B = global_batch_size // process_count. Its
    get_state()/set_state() (or grain.checkpoint.CheckpointSave/Restore with
    orbax) resume the exact same stream. The state is a position in the
    global stream, the same on every process and for any process count.
  """
  process_index, process_count = _process_info(process_index, process_count)
  local_batch_size = _local_batch_size(global_batch_size, process_count)
  source = open_split(data_config, "train")
  num_examples = len(source)
  if num_examples < global_batch_size:
    raise ValueError(f"the train split ({num_examples} examples) is smaller "
                     f"than one batch ({global_batch_size})")
  rows = slice(process_index * local_batch_size,
               (process_index + 1) * local_batch_size)
  shuffle_seed, augment_seed = _stream_seeds(seed)
  transform = functools.partial(
      _augment_rows, rows=rows, global_batch_size=global_batch_size,
      random_flip=data_config.random_flip, crop_padding=data_config.crop_padding)
  # Shuffle and batch row indices, then read each batch in one call: batched
  # reads are several times cheaper than one record at a time.
  dataset = (
      grain.MapDataset.range(num_examples)
      .shuffle(seed=shuffle_seed)
      .repeat()  # reseeds the shuffle each epoch: a new order every epoch.
      .batch(global_batch_size, drop_remainder=True)
      .map(functools.partial(_take_rows, rows=rows))
      .map(functools.partial(_read_batch, source))
      # random_map draws the generator from (augment_seed, global batch index).
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
