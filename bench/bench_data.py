"""Throughput of the CIFAR-100 input pipeline; prints numbers, asserts nothing.

  python bench/bench_data.py [--data_dir=DIR] [--source=DIR] [--worker_count=N]

Without --data_dir the dataset is prepared from --source into a temporary
directory first (and that preparation is timed). Reports, per image or batch:
record decoding (the fast proto parse vs TFDS's generic decoder, and what a
PNG-encoded image would add), augmentation of a batch, and images/second of
the full augmented train stream.
"""

from __future__ import annotations

import io
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

import os as _os
import sys as _sys

# Runnable as `python bench/<name>.py` from the repository root.
_sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

from ldm_jax import data, huge_pages
from ldm_jax.data import augment, builder, pipeline

_DATA_DIR = flags.DEFINE_string("data_dir", None, "A prepared TFDS data dir.")
_SOURCE = flags.DEFINE_string(
    "source", "/work/shared/data/cifar100",
    "Source to prepare from when --data_dir is unset.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Train batch size.")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 300, "Batches timed.")
_WORKER_COUNT = flags.DEFINE_integer("worker_count", 0, "Grain workers.")


def _seconds(fn, repeats: int = 1) -> float:
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - start) / repeats


def _bench(data_dir: str) -> None:
  config = data.default_data_config()
  config.data_dir = data_dir
  config.worker_count = _WORKER_COUNT.value
  batch_size = _BATCH_SIZE.value
  source = builder.open_split(config, "train")
  rng = np.random.default_rng(0)
  indices = rng.permutation(len(source))[:5000]

  per_image = _seconds(lambda: pipeline.read_examples(source, indices)) / 5000
  print(f"fast read+parse (random rows):   {per_image * 1e6:7.1f} us/image")
  per_image = _seconds(lambda: source.__getitems__(indices.tolist())) / 5000
  print(f"TFDS generic decode (random):    {per_image * 1e6:7.1f} us/image")

  images, _ = pipeline.read_examples(source, indices[:2000])
  pngs = []
  for image in images:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    pngs.append(buffer.getvalue())
  decode = lambda: [np.asarray(Image.open(io.BytesIO(b))) for b in pngs]
  raw = [image.tobytes() for image in images]
  frombuffer = lambda: [np.frombuffer(b, np.uint8).reshape(32, 32, 3)
                        for b in raw]
  print(f"PNG decode (PIL), if stored PNG: "
        f"{_seconds(decode) / len(pngs) * 1e6:7.1f} us/image "
        f"(mean {np.mean([len(b) for b in pngs]):.0f} bytes); raw bytes: "
        f"{_seconds(frombuffer) / len(raw) * 1e6:.1f} us/image (3072 bytes)")

  batch = {"image": images[:batch_size], "label": np.zeros(batch_size)}
  cost = _seconds(lambda: augment.augment_batch(batch, rng), repeats=50)
  print(f"augmentation:                    {cost * 1e3:7.2f} ms/batch of "
        f"{batch_size} ({cost / batch_size * 1e6:.1f} us/image)")

  cost = _seconds(lambda: data.load_split_images(config, "train"))
  print(f"load_split_images(train):        {cost:7.2f} s for 50,000 "
        f"({50_000 / cost:,.0f} images/s)")

  iterator = data.train_iterator(config, batch_size, seed=0, process_index=0,
                                 process_count=1)
  for _ in range(10):  # Warm-up: start threads/workers, fill the prefetch.
    next(iterator)
  num_batches = _NUM_BATCHES.value
  cost = _seconds(lambda: [next(iterator) for _ in range(num_batches)])
  print(f"train stream (batch {batch_size}, workers {config.worker_count}): "
        f"{num_batches * batch_size / cost:,.0f} images/s "
        f"({cost / num_batches * 1e3:.2f} ms/batch)")


def main(argv: list[str]) -> None:
  del argv
  if _DATA_DIR.value:
    _bench(_DATA_DIR.value)
    return
  with tempfile.TemporaryDirectory() as data_dir:
    cost = _seconds(lambda: data.prepare(data_dir, _SOURCE.value))
    print(f"prepare from {_SOURCE.value}: {cost:.1f} s")
    _bench(data_dir)


if __name__ == "__main__":
  huge_pages.reexec_with_huge_pages()  # Time what train.py gets.
  app.run(main)
