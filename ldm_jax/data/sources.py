"""Readers for the raw CIFAR-100 sources, with the checks that make them safe.

Three sources are accepted, and each is turned into the same in-memory
`Cifar100` (uint8 NHWC images, fine and coarse labels, label names):

* the official python archive ``cifar-100-python.tar.gz`` (pickled batches),
* the official binary archive ``cifar-100-binary.tar.gz`` (fixed-size records),
* a directory of numpy shards (``cifar100_train_{k}of{n}.npz`` plus
  ``cifar100_test.npz``, ``labels.txt`` and ``coarse_labels.txt``).

Everything is validated before a single byte of the TFDS dataset is written:
a bad source raises `DataError` naming the file and the problem.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import re
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Mapping

import numpy as np

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 100
NUM_COARSE_CLASSES = 20
SPLITS = ("train", "test")
OFFICIAL_SPLIT_SIZES: Mapping[str, int] = {"train": 50_000, "test": 10_000}

DOWNLOAD_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
PYTHON_ARCHIVE = "cifar-100-python.tar.gz"
BINARY_ARCHIVE = "cifar-100-binary.tar.gz"
# (hash algorithm, hex digest) of the official archives. The md5 is the one the
# dataset page and torchvision publish; the sha256 is the one TFDS registers
# for its own cifar100 builder (tensorflow_datasets/url_checksums/cifar100.txt).
ARCHIVE_CHECKSUMS: dict[str, tuple[str, str]] = {
    PYTHON_ARCHIVE: ("md5", "eb9058c3a382ffc7106e4002c42a8d85"),
    BINARY_ARCHIVE: (
        "sha256",
        "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec"),
}

NPZ_TRAIN_PATTERN = re.compile(r"^cifar100_train_(\d+)of(\d+)\.npz$")
NPZ_TEST_FILE = "cifar100_test.npz"
NPZ_LABEL_NAMES = "labels.txt"
NPZ_COARSE_LABEL_NAMES = "coarse_labels.txt"
NPZ_CHECKSUMS = "SHA256SUMS"

_BINARY_RECORD_BYTES = 2 + int(np.prod(IMAGE_SHAPE))  # coarse, fine, pixels.
_HASH_CHUNK_BYTES = 1 << 20


class DataError(ValueError):
  """A data source is missing, corrupt, or not the CIFAR-100 it claims to be."""


@dataclasses.dataclass(frozen=True)
class Split:
  """One split held in memory; `origin` names the file(s) it came from."""
  images: np.ndarray         # uint8 (N, 32, 32, 3), RGB.
  labels: np.ndarray         # fine labels, 0..99.
  coarse_labels: np.ndarray  # coarse labels, 0..19.
  origin: str


@dataclasses.dataclass(frozen=True)
class Cifar100:
  """The whole dataset as read from one source, before it is written."""
  splits: dict[str, Split]
  label_names: list[str]
  coarse_label_names: list[str]
  origin: str


# ------------------------------------------------------------------ checksums


def file_digest(path: str, algorithm: str) -> str:
  """Hex digest of a file, read in chunks so archives never sit in memory."""
  hasher = hashlib.new(algorithm)
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_HASH_CHUNK_BYTES), b""):
      hasher.update(chunk)
  return hasher.hexdigest()


def verify_checksum(path: str, algorithm: str, expected: str) -> None:
  """Raises `DataError` unless the file's digest is `expected`."""
  actual = file_digest(path, algorithm)
  if actual != expected.lower():
    raise DataError(
        f"{path}: checksum mismatch ({algorithm} is {actual}, expected "
        f"{expected}); the file is corrupt, truncated or not the official "
        "archive. Delete it and fetch it again.")


def download_archive(dest_dir: str, url: str = DOWNLOAD_URL,
                     filename: str = PYTHON_ARCHIVE,
                     timeout_s: float = 60.0) -> str:
  """Downloads `url` to `dest_dir/filename` and verifies its checksum.

  The bytes go to a ``.part`` file that is renamed only once the digest
  matches, so an interrupted or corrupted download is never mistaken for a
  good archive. An archive already in place is reused after verification.

  Returns:
    The path of the verified archive.
  """
  algorithm, expected = ARCHIVE_CHECKSUMS[filename]
  path = os.path.join(dest_dir, filename)
  if os.path.exists(path):
    verify_checksum(path, algorithm, expected)
    return path
  created = _missing_directories(dest_dir)
  os.makedirs(dest_dir, exist_ok=True)
  partial = path + ".part"
  hasher = hashlib.new(algorithm)
  try:
    with urllib.request.urlopen(url, timeout=timeout_s) as response, \
        open(partial, "wb") as out:
      for chunk in iter(lambda: response.read(_HASH_CHUNK_BYTES), b""):
        hasher.update(chunk)
        out.write(chunk)
  except (urllib.error.URLError, OSError) as e:
    _remove_if_exists(partial)
    _remove_empty(created)  # A failed download leaves no trace on disk.
    raise DataError(
        f"could not download {url}: {e}. Without internet access, fetch "
        f"{PYTHON_ARCHIVE} (or {BINARY_ARCHIVE}) elsewhere, or use the numpy "
        "shards, and pass their directory with --from.") from e
  if hasher.hexdigest() != expected:
    _remove_if_exists(partial)
    _remove_empty(created)
    raise DataError(
        f"{url}: checksum mismatch ({algorithm} is {hasher.hexdigest()}, "
        f"expected {expected}); the download was corrupted, try again.")
  os.replace(partial, path)
  return path


def _missing_directories(path: str) -> list[str]:
  """`path` and those of its parents that do not exist yet, deepest first."""
  missing = []
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    missing.append(path)
    path = os.path.dirname(path)
  return missing


def _remove_empty(directories: list[str]) -> None:
  for directory in directories:
    try:
      os.rmdir(directory)
    except OSError:
      return


def _remove_if_exists(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


# --------------------------------------------------------- official archives


def _tar_member_bytes(archive: tarfile.TarFile, archive_path: str,
                      member: str) -> bytes:
  try:
    f = archive.extractfile(member)
  except KeyError:
    f = None
  if f is None:
    raise DataError(f"{archive_path}: member {member!r} is missing")
  with f:
    return f.read()


def _open_verified_archive(path: str) -> tarfile.TarFile:
  # The checksum comes first: the python archive is unpickled, and only the
  # official, verified bytes should ever reach pickle.
  algorithm, expected = ARCHIVE_CHECKSUMS[os.path.basename(path)]
  verify_checksum(path, algorithm, expected)
  try:
    return tarfile.open(path, "r:gz")
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    raise DataError(f"{path}: not a readable .tar.gz archive ({e})") from e


def _chw_rows_to_nhwc(rows: np.ndarray) -> np.ndarray:
  """(N, 3072) channel-major rows, as both archives store them, to NHWC."""
  height, width, channels = IMAGE_SHAPE
  images = rows.reshape(-1, channels, height, width).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images)


def read_python_archive(path: str) -> Cifar100:
  """Reads the official ``cifar-100-python.tar.gz``."""
  splits = {}
  with _open_verified_archive(path) as archive:
    try:
      for split in SPLITS:
        batch = pickle.loads(
            _tar_member_bytes(archive, path, f"cifar-100-python/{split}"),
            encoding="bytes")
        origin = f"{path}:cifar-100-python/{split}"
        rows = np.asarray(batch[b"data"])
        if rows.dtype != np.uint8 or rows.ndim != 2 or (
            rows.shape[1] != np.prod(IMAGE_SHAPE)):
          raise DataError(f"{origin}: expected uint8 rows of 3072 pixels, got "
                          f"{rows.dtype} {rows.shape}")
        splits[split] = Split(
            images=_chw_rows_to_nhwc(rows),
            labels=np.asarray(batch[b"fine_labels"]),
            coarse_labels=np.asarray(batch[b"coarse_labels"]),
            origin=origin)
      meta = pickle.loads(
          _tar_member_bytes(archive, path, "cifar-100-python/meta"),
          encoding="bytes")
      label_names = [n.decode() for n in meta[b"fine_label_names"]]
      coarse_names = [n.decode() for n in meta[b"coarse_label_names"]]
    except (KeyError, TypeError, AttributeError, pickle.UnpicklingError,
            EOFError, tarfile.TarError, zlib.error) as e:
      raise DataError(f"{path}: unexpected content ({e!r})") from e
  return Cifar100(splits, label_names, coarse_names, origin=path)


def read_binary_archive(path: str) -> Cifar100:
  """Reads the official ``cifar-100-binary.tar.gz``."""
  splits = {}
  with _open_verified_archive(path) as archive:
    try:
      for split in SPLITS:
        member = f"cifar-100-binary/{split}.bin"
        raw = _tar_member_bytes(archive, path, member)
        if len(raw) % _BINARY_RECORD_BYTES:
          raise DataError(
              f"{path}:{member}: {len(raw)} bytes is not a whole number of "
              f"{_BINARY_RECORD_BYTES}-byte records")
        records = np.frombuffer(raw, np.uint8).reshape(-1, _BINARY_RECORD_BYTES)
        splits[split] = Split(
            images=_chw_rows_to_nhwc(records[:, 2:]),
            labels=records[:, 1].copy(),
            coarse_labels=records[:, 0].copy(),
            origin=f"{path}:{member}")
      label_names = _parse_names(
          _tar_member_bytes(archive, path,
                            "cifar-100-binary/fine_label_names.txt"))
      coarse_names = _parse_names(
          _tar_member_bytes(archive, path,
                            "cifar-100-binary/coarse_label_names.txt"))
    except (EOFError, tarfile.TarError, zlib.error) as e:
      raise DataError(f"{path}: unexpected content ({e!r})") from e
  return Cifar100(splits, label_names, coarse_names, origin=path)


def _parse_names(raw: bytes) -> list[str]:
  return [line.strip() for line in raw.decode().splitlines() if line.strip()]


# ------------------------------------------------------------- numpy shards


def _verify_sha256sums(directory: str) -> None:
  """Checks every file listed in the directory's SHA256SUMS, if it has one."""
  sums_path = os.path.join(directory, NPZ_CHECKSUMS)
  if not os.path.exists(sums_path):
    return
  with open(sums_path) as f:
    for line in f:
      if not line.strip():
        continue
      digest, name = line.split(maxsplit=1)
      path = os.path.join(directory, name.strip().lstrip("*"))
      if not os.path.exists(path):
        raise DataError(f"{path}: listed in {sums_path} but missing")
      verify_checksum(path, "sha256", digest)


def _find_train_shards(directory: str) -> list[str]:
  shards = {}
  counts = set()
  for name in os.listdir(directory):
    match = NPZ_TRAIN_PATTERN.match(name)
    if match:
      shards[int(match.group(1))] = name
      counts.add(int(match.group(2)))
  if not shards:
    raise DataError(
        f"{directory}: no train shards cifar100_train_{{k}}of{{n}}.npz")
  if len(counts) != 1:
    raise DataError(f"{directory}: train shards disagree on the shard count "
                    f"({sorted(counts)})")
  count = counts.pop()
  missing = [f"cifar100_train_{k}of{count}.npz" for k in range(count)
             if k not in shards]
  if missing:
    raise DataError(f"{directory}: missing train shard(s) {missing}")
  extra = [name for k, name in shards.items() if k >= count]
  if extra:
    raise DataError(f"{directory}: unexpected train shard(s) {extra}")
  return [os.path.join(directory, shards[k]) for k in range(count)]


def _load_npz_split(path: str, split: str) -> Split:
  keys = {"images": f"{split}_images", "labels": f"{split}_fine_labels",
          "coarse_labels": f"{split}_coarse_labels"}
  try:
    # allow_pickle=False: numeric arrays only, nothing executable.
    with np.load(path, allow_pickle=False) as npz:
      files = list(npz.files)
      arrays = {field: npz[key] for field, key in keys.items() if key in files}
  except (OSError, ValueError, zlib.error, EOFError, zipfile.BadZipFile) as e:
    # BadZipFile: a truncated or damaged shard (np.load reads .npz as a zip).
    raise DataError(f"{path}: not a readable .npz file ({e})") from e
  missing = [key for key in keys.values() if key not in files]
  if missing:
    raise DataError(f"{path}: missing key(s) {missing} (has {files})")
  return Split(**arrays, origin=path)


def _concat_splits(parts: list[Split], origin: str) -> Split:
  for part in parts:
    _check_split_arrays(part)
  return Split(
      images=np.concatenate([p.images for p in parts]),
      labels=np.concatenate([p.labels for p in parts]),
      coarse_labels=np.concatenate([p.coarse_labels for p in parts]),
      origin=origin)


def _read_names_file(path: str) -> list[str]:
  if not os.path.exists(path):
    raise DataError(f"{path}: missing (label names)")
  with open(path, "rb") as f:
    return _parse_names(f.read())


def read_npz_directory(directory: str) -> Cifar100:
  """Reads numpy shards in the layout of /work/shared/data/cifar100."""
  _verify_sha256sums(directory)
  train_paths = _find_train_shards(directory)
  test_path = os.path.join(directory, NPZ_TEST_FILE)
  if not os.path.exists(test_path):
    raise DataError(f"{test_path}: missing (test split)")
  train = _concat_splits([_load_npz_split(p, "train") for p in train_paths],
                         origin=", ".join(train_paths))
  test = _load_npz_split(test_path, "test")
  return Cifar100(
      {"train": train, "test": test},
      _read_names_file(os.path.join(directory, NPZ_LABEL_NAMES)),
      _read_names_file(os.path.join(directory, NPZ_COARSE_LABEL_NAMES)),
      origin=directory)


# ---------------------------------------------------------------- dispatch


def read_source(path: str) -> Cifar100:
  """Reads whichever supported source `path` is or holds.

  A file must be one of the official archives; a directory is searched for
  the python archive, then the binary archive, then the numpy shards.
  """
  if not os.path.exists(path):
    raise DataError(f"{path}: no such file or directory")
  if os.path.isfile(path):
    candidates = [path]
  else:
    candidates = [os.path.join(path, name)
                  for name in (PYTHON_ARCHIVE, BINARY_ARCHIVE)]
  for candidate in candidates:
    name = os.path.basename(candidate)
    if name == PYTHON_ARCHIVE and os.path.exists(candidate):
      return read_python_archive(candidate)
    if name == BINARY_ARCHIVE and os.path.exists(candidate):
      return read_binary_archive(candidate)
  if os.path.isdir(path) and any(
      NPZ_TRAIN_PATTERN.match(n) or n == NPZ_TEST_FILE
      for n in os.listdir(path)):
    return read_npz_directory(path)
  raise DataError(
      f"{path}: found no CIFAR-100 source; expected {PYTHON_ARCHIVE}, "
      f"{BINARY_ARCHIVE}, or a directory with cifar100_train_{{k}}of{{n}}.npz "
      f"shards and {NPZ_TEST_FILE}")


# -------------------------------------------------------------- validation


def _check_split_arrays(split: Split) -> None:
  """Shape, dtype and range checks of one split, naming its file on failure."""
  images, labels, coarse = split.images, split.labels, split.coarse_labels
  where = split.origin
  if images.dtype != np.uint8 or images.ndim != 4 or (
      images.shape[1:] != IMAGE_SHAPE):
    raise DataError(f"{where}: images must be uint8 (N, 32, 32, 3), got "
                    f"{images.dtype} {images.shape}")
  for name, values, num in (("fine labels", labels, NUM_CLASSES),
                            ("coarse labels", coarse, NUM_COARSE_CLASSES)):
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
      raise DataError(f"{where}: {name} must be a 1-D integer array, got "
                      f"{values.dtype} {values.shape}")
    if len(values) != len(images):
      raise DataError(f"{where}: {len(images)} images but {len(values)} "
                      f"{name}")
    if len(values) and (values.min() < 0 or values.max() >= num):
      raise DataError(f"{where}: {name} out of range 0..{num - 1} (found "
                      f"{values.min()}..{values.max()})")


def _check_names(names: list[str], expected: int, what: str,
                 origin: str) -> None:
  if len(names) != expected or len(set(names)) != expected:
    raise DataError(f"{origin}: expected {expected} distinct {what} names, "
                    f"got {len(names)} ({len(set(names))} distinct)")


def validate(data: Cifar100,
             expected_sizes: Mapping[str, int] | None = None) -> None:
  """Raises `DataError` unless `data` is a complete, well-formed CIFAR-100.

  Args:
    data: what a reader returned.
    expected_sizes: examples per split; the official 50,000 / 10,000 unless
      given (tests pass small sizes to keep fake datasets tiny).
  """
  expected_sizes = dict(expected_sizes or OFFICIAL_SPLIT_SIZES)
  if sorted(data.splits) != sorted(expected_sizes):
    raise DataError(f"{data.origin}: splits {sorted(data.splits)}, expected "
                    f"{sorted(expected_sizes)}")
  for name, split in data.splits.items():
    _check_split_arrays(split)
    if len(split.labels) != expected_sizes[name]:
      raise DataError(f"{split.origin}: the {name} split has "
                      f"{len(split.labels)} examples, expected "
                      f"{expected_sizes[name]}")
  _check_names(data.label_names, NUM_CLASSES, "fine label", data.origin)
  _check_names(data.coarse_label_names, NUM_COARSE_CLASSES, "coarse label",
               data.origin)

