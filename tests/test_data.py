"""Tests of ldm_jax.data on tiny fake CIFAR-100 sources written to tmp_path.

The fakes have 200 train / 100 test images (validation is told those sizes),
random pixels so every image is unique, and a label layout that is sorted by
class like the real numpy shards, which exercises the shuffling.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from ldm_jax import data
from ldm_jax.data import augment, builder, pipeline, sources

SIZES = {"train": 200, "test": 100}
FINE_NAMES = [f"fine_{i:02d}" for i in range(100)]
COARSE_NAMES = [f"coarse_{i:02d}" for i in range(20)]
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------- fakes


def fake_split(num: int, seed: int) -> sources.Split:
  rng = np.random.default_rng(seed)
  labels = (np.arange(num) % 100).astype(np.uint8)
  return sources.Split(
      images=rng.integers(0, 256, (num, 32, 32, 3), dtype=np.uint8),
      labels=labels, coarse_labels=(labels % 20).astype(np.uint8),
      origin="fake")


@pytest.fixture(scope="module")
def fake():
  return {"train": fake_split(SIZES["train"], 0),
          "test": fake_split(SIZES["test"], 1)}


def _nhwc_to_rows(images: np.ndarray) -> np.ndarray:
  return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _add_bytes(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  archive.addfile(info, io.BytesIO(payload))


def _names_bytes(names: list[str]) -> bytes:
  return "".join(n + "\n" for n in names).encode()


def write_python_archive(directory, fake) -> str:
  path = os.path.join(directory, sources.PYTHON_ARCHIVE)
  with tarfile.open(path, "w:gz") as archive:
    for split, arrays in fake.items():
      _add_bytes(archive, f"cifar-100-python/{split}", pickle.dumps({
          b"data": _nhwc_to_rows(arrays.images),
          b"fine_labels": arrays.labels.tolist(),
          b"coarse_labels": arrays.coarse_labels.tolist()}))
    _add_bytes(archive, "cifar-100-python/meta", pickle.dumps({
        b"fine_label_names": [n.encode() for n in FINE_NAMES],
        b"coarse_label_names": [n.encode() for n in COARSE_NAMES]}))
  return path


def write_binary_archive(directory, fake) -> str:
  path = os.path.join(directory, sources.BINARY_ARCHIVE)
  with tarfile.open(path, "w:gz") as archive:
    for split, arrays in fake.items():
      records = np.concatenate([arrays.coarse_labels[:, None],
                                arrays.labels[:, None],
                                _nhwc_to_rows(arrays.images)], axis=1)
      _add_bytes(archive, f"cifar-100-binary/{split}.bin",
                 records.astype(np.uint8).tobytes())
    _add_bytes(archive, "cifar-100-binary/fine_label_names.txt",
               _names_bytes(FINE_NAMES))
    _add_bytes(archive, "cifar-100-binary/coarse_label_names.txt",
               _names_bytes(COARSE_NAMES))
  return path


def write_npz_directory(directory, fake, num_shards: int = 4) -> str:
  os.makedirs(directory, exist_ok=True)
  train = fake["train"]
  for k, rows in enumerate(np.array_split(np.arange(len(train.labels)),
                                          num_shards)):
    np.savez(os.path.join(directory, f"cifar100_train_{k}of{num_shards}.npz"),
             train_images=train.images[rows],
             train_fine_labels=train.labels[rows],
             train_coarse_labels=train.coarse_labels[rows])
  test = fake["test"]
  np.savez(os.path.join(directory, sources.NPZ_TEST_FILE),
           test_images=test.images, test_fine_labels=test.labels,
           test_coarse_labels=test.coarse_labels)
  with open(os.path.join(directory, "labels.txt"), "wb") as f:
    f.write(_names_bytes(FINE_NAMES))
  with open(os.path.join(directory, "coarse_labels.txt"), "wb") as f:
    f.write(_names_bytes(COARSE_NAMES))
  return directory


def trust_archive(monkeypatch, path: str) -> None:
  """Registers a fake archive's md5 as the official checksum."""
  digest = hashlib.md5(open(path, "rb").read()).hexdigest()
  monkeypatch.setitem(sources.ARCHIVE_CHECKSUMS, os.path.basename(path),
                      ("md5", digest))


def config_for(data_dir, source=None, **overrides):
  config = data.default_data_config()
  config.data_dir = str(data_dir)
  config.source = source
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, fake):
  """A dataset prepared once from the numpy shards, shared by stream tests."""
  root = tmp_path_factory.mktemp("prepared")
  source = write_npz_directory(str(root / "npz"), fake)
  data.prepare(str(root / "tfds"), source, expected_sizes=SIZES)
  return config_for(root / "tfds")


def rows_of(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """Index in `reference` of every image (all fake images are distinct)."""
  lookup = {img.tobytes(): i for i, img in enumerate(reference)}
  return np.array([lookup[img.tobytes()] for img in images])


def as_uint8(images: np.ndarray) -> np.ndarray:
  return np.rint((images + 1.0) * 127.5).astype(np.uint8)


# ------------------------------------------------------------- defaults


def test_default_data_config_has_the_agreed_fields():
  config = data.default_data_config()
  assert config.to_dict() == {
      "name": "cifar100", "data_dir": None, "source": None, "image_size": 32,
      "num_classes": 100, "random_flip": True, "crop_padding": 4,
      "worker_count": 0}


# ------------------------------------------------------------ checksums


def test_verify_checksum_accepts_match_and_names_file_on_mismatch(tmp_path):
  path = tmp_path / "blob.bin"
  path.write_bytes(b"cifar" * 1000)
  good = hashlib.md5(path.read_bytes()).hexdigest()
  sources.verify_checksum(str(path), "md5", good)
  with pytest.raises(sources.DataError, match="blob.bin.*checksum mismatch"):
    sources.verify_checksum(str(path), "md5", "0" * 32)


def test_official_checksums_are_the_published_values():
  assert sources.ARCHIVE_CHECKSUMS[sources.PYTHON_ARCHIVE] == (
      "md5", "eb9058c3a382ffc7106e4002c42a8d85")
  algorithm, digest = sources.ARCHIVE_CHECKSUMS[sources.BINARY_ARCHIVE]
  assert algorithm == "sha256" and len(digest) == 64


def test_download_verifies_then_renames(tmp_path, monkeypatch):
  served = tmp_path / "served"
  served.mkdir()
  archive = served / sources.PYTHON_ARCHIVE
  archive.write_bytes(os.urandom(5000))
  url = archive.as_uri()
  dest = tmp_path / "downloads"

  monkeypatch.setitem(sources.ARCHIVE_CHECKSUMS, sources.PYTHON_ARCHIVE,
                      ("md5", "0" * 32))
  with pytest.raises(sources.DataError, match="checksum mismatch"):
    sources.download_archive(str(dest), url=url)
  assert not dest.exists()  # No archive, no .part file, not even the directory.

  trust_archive(monkeypatch, str(archive))
  path = sources.download_archive(str(dest), url=url)
  assert open(path, "rb").read() == archive.read_bytes()
  assert os.listdir(dest) == [sources.PYTHON_ARCHIVE]


def test_download_without_network_fails_clearly(tmp_path):
  # Port 9 (discard) on localhost refuses at once: no real network needed.
  with pytest.raises(sources.DataError, match="could not download.*--from"):
    sources.download_archive(str(tmp_path / "data" / "downloads"),
                             url="http://127.0.0.1:9/cifar-100-python.tar.gz",
                             timeout_s=5)
  assert os.listdir(tmp_path) == []  # The directories it made are gone again.


# ------------------------------------------------- sources and prepare


def _load_everything(config):
  loaded = {split: data.load_split_images(config, split)
            for split in sources.SPLITS}
  coarse = [int(e["coarse_label"])
            for e in builder.open_split(config, "train").__getitems__(
                list(range(SIZES["train"])))]
  return loaded, coarse, data.class_names(config)


def test_every_source_format_gives_the_same_dataset(tmp_path, monkeypatch,
                                                    fake):
  sources_dir = {}
  for kind, writer in (("python", write_python_archive),
                       ("binary", write_binary_archive)):
    directory = tmp_path / kind
    directory.mkdir()
    trust_archive(monkeypatch, writer(str(directory), fake))
    sources_dir[kind] = str(directory)
  sources_dir["npz"] = write_npz_directory(str(tmp_path / "npz"), fake)

  results = {}
  for kind, source in sources_dir.items():
    data.prepare(str(tmp_path / f"tfds_{kind}"), source, expected_sizes=SIZES)
    results[kind] = _load_everything(config_for(tmp_path / f"tfds_{kind}"))

  loaded, coarse, names = results["npz"]
  assert names == FINE_NAMES
  for split in sources.SPLITS:
    images, labels = loaded[split]
    assert images.dtype == np.uint8
    assert images.shape == (SIZES[split], 32, 32, 3)
    # Same examples as the fake source, each with its own label...
    rows = rows_of(images, fake[split].images)
    assert sorted(rows) == list(range(SIZES[split]))
    np.testing.assert_array_equal(labels, fake[split].labels[rows])
  train_rows = rows_of(loaded["train"][0], fake["train"].images)
  np.testing.assert_array_equal(coarse,
                                fake["train"].coarse_labels[train_rows])
  # ...and identical, in the same stored order, whatever the source format.
  for kind in ("python", "binary"):
    other_loaded, other_coarse, other_names = results[kind]
    assert other_names == names and other_coarse == coarse
    for split in sources.SPLITS:
      for ours, theirs in zip(loaded[split], other_loaded[split]):
        np.testing.assert_array_equal(ours, theirs)


def test_stored_features_match_tfds_cifar100(prepared):
  features = builder.open_split(prepared, "test").dataset_info.features
  assert set(features.keys()) == {"id", "image", "label", "coarse_label"}
  assert features["image"].shape == (32, 32, 3)
  assert features["label"].num_classes == 100
  assert features["coarse_label"].num_classes == 20
  assert features["coarse_label"].names == COARSE_NAMES


def _assert_nothing_written(data_dir):
  assert not builder.is_prepared(str(data_dir))
  dataset_root = os.path.join(str(data_dir), builder.DATASET_NAME)
  leftovers = os.listdir(dataset_root) if os.path.exists(dataset_root) else []
  assert leftovers == []


@pytest.mark.parametrize("problem, expected_message", [
    ("missing_shard", r"cifar100_train_2of4\.npz"),
    ("float_images", r"cifar100_test\.npz: images must be uint8"),
    ("label_out_of_range", r"cifar100_test\.npz: fine labels out of range"),
    ("missing_key", r"cifar100_test\.npz: missing key"),
    ("wrong_shape",
     r"cifar100_test\.npz: images must be uint8 \(N, 32, 32, 3\)"),
    ("split_size", r"the test split has 99 examples, expected 100"),
    ("not_npz", r"cifar100_test\.npz: not a readable"),
    ("missing_names", r"labels\.txt: missing"),
])
def test_bad_npz_source_is_rejected_before_writing(tmp_path, fake, problem,
                                                   expected_message):
  source = str(tmp_path / "npz")
  test = fake["test"]
  good = dict(test_images=test.images, test_fine_labels=test.labels,
              test_coarse_labels=test.coarse_labels)
  write_npz_directory(source, fake)
  test_file = os.path.join(source, sources.NPZ_TEST_FILE)
  if problem == "missing_shard":
    os.remove(os.path.join(source, "cifar100_train_2of4.npz"))
  elif problem == "float_images":
    np.savez(test_file,
             **{**good, "test_images": test.images.astype(np.float32)})
  elif problem == "label_out_of_range":
    np.savez(test_file, **{**good, "test_fine_labels": test.labels + 1})
  elif problem == "missing_key":
    np.savez(test_file, test_images=test.images)
  elif problem == "wrong_shape":
    np.savez(test_file, **{**good, "test_images": test.images[:, :16]})
  elif problem == "split_size":
    np.savez(test_file, **{k: v[:99] for k, v in good.items()})
  elif problem == "not_npz":
    with open(test_file, "wb") as f:
      f.write(b"not a zip file")
  elif problem == "missing_names":
    os.remove(os.path.join(source, "labels.txt"))
  with pytest.raises(sources.DataError, match=expected_message):
    data.prepare(str(tmp_path / "tfds"), source, expected_sizes=SIZES)
  _assert_nothing_written(tmp_path / "tfds")


def test_real_split_sizes_are_the_default(tmp_path, fake):
  source = write_npz_directory(str(tmp_path / "npz"), fake)
  with pytest.raises(sources.DataError, match="expected 50000"):
    data.prepare(str(tmp_path / "tfds"), source)
  _assert_nothing_written(tmp_path / "tfds")


def test_archive_with_wrong_checksum_is_rejected(tmp_path, fake):
  # Not registered with trust_archive: the official checksum cannot match.
  write_python_archive(str(tmp_path), fake)
  with pytest.raises(sources.DataError,
                     match=r"cifar-100-python\.tar\.gz: checksum mismatch"):
    data.prepare(str(tmp_path / "tfds"), str(tmp_path), expected_sizes=SIZES)
  _assert_nothing_written(tmp_path / "tfds")


def test_npz_sha256sums_are_checked(tmp_path, fake):
  source = write_npz_directory(str(tmp_path / "npz"), fake)
  with open(os.path.join(source, "SHA256SUMS"), "w") as f:
    f.write(f"{'0' * 64}  {sources.NPZ_TEST_FILE}\n")
  with pytest.raises(sources.DataError,
                     match=r"cifar100_test\.npz: checksum mismatch"):
    data.prepare(str(tmp_path / "tfds"), source, expected_sizes=SIZES)


def test_empty_source_directory_says_what_it_expected(tmp_path):
  with pytest.raises(sources.DataError, match="found no CIFAR-100 source"):
    data.prepare(str(tmp_path / "tfds"), str(tmp_path), expected_sizes=SIZES)


def test_crash_while_writing_leaves_nothing_a_later_run_trusts(
    tmp_path, monkeypatch, fake):
  source = write_npz_directory(str(tmp_path / "npz"), fake)
  original = builder.Cifar100Ldm._generate_examples

  def crash_halfway(self, split_name, split):
    for count, example in enumerate(original(self, split_name, split)):
      if count == 50:
        raise RuntimeError("simulated crash")
      yield example

  monkeypatch.setattr(builder.Cifar100Ldm, "_generate_examples", crash_halfway)
  with pytest.raises(RuntimeError, match="simulated crash"):
    data.prepare(str(tmp_path / "tfds"), source, expected_sizes=SIZES)
  _assert_nothing_written(tmp_path / "tfds")

  monkeypatch.setattr(builder.Cifar100Ldm, "_generate_examples", original)
  data.prepare(str(tmp_path / "tfds"), source, expected_sizes=SIZES)
  images, _ = data.load_split_images(config_for(tmp_path / "tfds"), "train")
  assert len(images) == SIZES["train"]


def test_ensure_prepared_prepares_once_then_does_nothing(tmp_path,
                                                         monkeypatch, fake):
  source = write_npz_directory(str(tmp_path / "npz"), fake)
  config = config_for(tmp_path / "tfds", source)
  monkeypatch.setattr(sources, "OFFICIAL_SPLIT_SIZES", SIZES)
  data.ensure_prepared(config)
  info = os.path.join(builder.dataset_dir(config.data_dir), "dataset_info.json")
  stamp = os.stat(info).st_mtime_ns
  data.ensure_prepared(config)
  assert os.stat(info).st_mtime_ns == stamp
  assert data.load_split_images(config, "test")[0].shape[0] == SIZES["test"]


def test_ensure_prepared_explains_how_to_prepare_by_hand(tmp_path):
  config = config_for(tmp_path / "tfds", str(tmp_path / "nowhere"))
  with pytest.raises(sources.DataError,
                     match="python -m ldm_jax.data prepare --data_dir="):
    data.ensure_prepared(config)
  with pytest.raises(sources.DataError, match="ensure_prepared"):
    data.load_split_images(config, "test")


def test_command_line_prepare(tmp_path, fake):
  source = write_npz_directory(str(tmp_path / "npz"), fake)
  env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
  command = [sys.executable, "-m", "ldm_jax.data", "prepare",
             f"--data_dir={tmp_path / 'tfds'}", f"--from={source}",
             "--train_size=200", "--test_size=100"]
  done = subprocess.run(command, env=env, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0, done.stderr
  assert builder.is_prepared(str(tmp_path / "tfds"))
  images, _ = data.load_split_images(config_for(tmp_path / "tfds"), "train")
  assert len(images) == SIZES["train"]


# --------------------------------------------------------------- reading


def test_fast_record_parsing_matches_tfds_decoding(prepared):
  source = builder.open_split(prepared, "train")
  indices = [5, 0, 199, 42]
  images, labels = pipeline.read_examples(source, indices)
  reference = source.__getitems__(indices)
  for image, label, example in zip(images, labels, reference):
    np.testing.assert_array_equal(image, example["image"])
    assert label == example["label"]


def test_load_split_images_prefix(prepared):
  all_images, all_labels = data.load_split_images(prepared, "test")
  images, labels = data.load_split_images(prepared, "test", num_examples=30)
  np.testing.assert_array_equal(images, all_images[:30])
  np.testing.assert_array_equal(labels, all_labels[:30])
  with pytest.raises(ValueError, match="num_examples"):
    data.load_split_images(prepared, "test", num_examples=101)


def test_eval_batches_cover_the_split_in_order_on_any_process_count(prepared):
  images, labels = data.load_split_images(prepared, "test")
  global_batch = 24
  for count in (1, 2, 3):
    per_process = [list(data.eval_batches(prepared, global_batch,
                                          process_index=p, process_count=count))
                   for p in range(count)]
    num_batches = [len(b) for b in per_process]
    assert num_batches == [-(-SIZES["test"] // global_batch)] * count
    # Stitch each global batch as shard_batch would: process slices in order.
    merged = {key: np.concatenate([b[key] for batches in zip(*per_process)
                                   for b in batches])
              for key in ("image", "label", "mask")}
    for batches in per_process:
      for batch in batches:
        assert batch["image"].shape == (global_batch // count, 32, 32, 3)
        assert batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32
    real = merged["mask"] == 1
    assert real.sum() == SIZES["test"] and real[:SIZES["test"]].all()
    np.testing.assert_array_equal(as_uint8(merged["image"][real]), images)
    np.testing.assert_array_equal(merged["label"][real], labels)


def test_eval_batches_num_examples(prepared):
  batches = list(data.eval_batches(prepared, 16, process_index=0,
                                   process_count=1, num_examples=20))
  assert len(batches) == 2
  assert batches[1]["mask"].tolist() == [1.0] * 4 + [0.0] * 12


# ------------------------------------------------------------ train stream


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_train_batches_shapes_and_range(prepared):
  it = data.train_iterator(prepared, 32, seed=0, process_index=0,
                           process_count=1)
  batch = next(it)
  assert batch["image"].shape == (32, 32, 32, 3)
  assert batch["image"].dtype == np.float32
  assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  assert isinstance(it, grain.DatasetIterator)


def test_train_epochs_are_permutations_in_new_orders(prepared):
  config = config_for(prepared.data_dir, random_flip=False, crop_padding=0)
  reference, _ = data.load_split_images(config, "train")
  it = data.train_iterator(config, 40, seed=3, process_index=0,
                           process_count=1)
  epochs = []
  for _ in range(2):  # 200 examples / 40 = 5 batches per epoch.
    images = np.concatenate([b["image"] for b in _take(it, 5)])
    epochs.append(rows_of(as_uint8(images), reference))
  for rows in epochs:
    assert sorted(rows) == list(range(SIZES["train"]))
  assert list(epochs[0]) != list(epochs[1])
  assert list(epochs[0]) != list(range(SIZES["train"]))


def test_train_batches_name_the_stored_image_and_its_flip(prepared):
  """`index` and `flip` say which stored image each row is, and whether it
  was mirrored: what the LDM's latent cache looks posteriors up by."""
  config = config_for(prepared.data_dir, random_flip=True, crop_padding=0)
  reference, _ = data.load_split_images(config, "train")
  for p in range(2):
    it = data.train_iterator(config, 40, seed=5, process_index=p, process_count=2)
    batches = _take(it, 3)
    index = np.concatenate([b["index"] for b in batches])
    flip = np.concatenate([b["flip"] for b in batches]).astype(bool)
    images = as_uint8(np.concatenate([b["image"] for b in batches]))
    expected = np.where(flip[:, None, None, None], reference[index][:, :, ::-1],
                        reference[index])
    np.testing.assert_array_equal(images, expected)
    assert 0 < flip.sum() < len(flip)


def test_train_stream_depends_only_on_seed(prepared):
  def first_labels(seed):
    it = data.train_iterator(prepared, 20, seed=seed, process_index=0,
                             process_count=1)
    return [b["label"].tolist() for b in _take(it, 3)]
  assert first_labels(7) == first_labels(7)
  assert first_labels(7) != first_labels(8)


def test_processes_read_disjoint_shards(prepared):
  config = config_for(prepared.data_dir, random_flip=False, crop_padding=0)
  reference, _ = data.load_split_images(config, "train")
  seen = []
  for p in range(2):
    it = data.train_iterator(config, 40, seed=0, process_index=p,
                             process_count=2)
    batches = _take(it, 5)  # 100 examples per process, 20 per batch.
    assert all(b["image"].shape[0] == 20 for b in batches)
    seen.append(set(rows_of(as_uint8(
        np.concatenate([b["image"] for b in batches])), reference)))
  assert len(seen[0]) == len(seen[1]) == 100
  assert not seen[0] & seen[1]


def _assert_same_batches(a, b):
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def test_set_state_resumes_the_exact_stream(prepared):
  make = lambda: data.train_iterator(prepared, 16, seed=1, process_index=0,
                                     process_count=1)
  it = make()
  _take(it, 9)
  state = it.get_state()
  # An epoch is 12.5 batches, so the resumed part crosses into epoch two.
  expected = _take(it, 8)
  resumed = make()
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 8), expected)


def test_orbax_checkpoint_of_the_iterator(prepared, tmp_path):
  make = lambda: data.train_iterator(prepared, 16, seed=2, process_index=0,
                                     process_count=1)
  it = make()
  _take(it, 4)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(4, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
  expected = _take(it, 3)
  resumed = make()
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.restore(4, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(resumed)))
  _assert_same_batches(_take(resumed, 3), expected)


def test_batch_size_must_split_over_processes(prepared):
  with pytest.raises(ValueError, match="multiple of process_count"):
    data.train_iterator(prepared, 30, seed=0, process_index=0, process_count=4)


# ------------------------------------------------------------ augmentation


def _reference_crop_and_flip(images, top, left, flip, padding):
  out = []
  for image, y, x, mirror in zip(images, top, left, flip):
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    crop = padded[y:y + image.shape[0], x:x + image.shape[1]]
    out.append(crop[:, ::-1] if mirror else crop)
  return np.stack(out)


def test_crop_and_flip_matches_per_image_reference():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
  top = rng.integers(0, 9, 64)
  left = rng.integers(0, 9, 64)
  flip = rng.random(64) < 0.5
  np.testing.assert_array_equal(
      augment.crop_and_flip(images, top, left, flip, 4),
      _reference_crop_and_flip(images, top, left, flip, 4))


def test_augmentation_statistics_and_determinism():
  # Each image is constant within each column except one marked pixel, so
  # the crop offset and flip are recoverable from where the mark lands.
  size = 2000
  images = np.zeros((size, 32, 32, 3), np.uint8)
  images[:, 10, 5] = 255
  batch = {"image": images, "label": np.zeros(size, np.int64)}
  out = augment.augment_batch(batch, np.random.default_rng(0))
  again = augment.augment_batch(batch, np.random.default_rng(0))
  np.testing.assert_array_equal(out["image"], again["image"])
  assert out["label"].dtype == np.int32
  assert set(np.unique(out["image"])) <= {-1.0, 1.0}
  marks = np.argwhere(out["image"][..., 0] == 1.0)  # (image, row, col)
  assert len(marks) == size  # The mark is never cropped away (4 + 4 < 10).
  rows, cols = marks[:, 1], marks[:, 2]
  top = 10 + 4 - rows
  assert set(top) == set(range(9))
  # Unflipped the mark is at column 5 + 4 - left in [1, 9]; flipped, mirrored
  # to 31 - that, in [22, 30].
  flipped = cols > 15
  assert 0.45 < flipped.mean() < 0.55
  left = np.where(flipped, 5 + 4 - (31 - cols), 5 + 4 - cols)
  assert set(left) == set(range(9))
  counts = np.bincount(top, minlength=9)
  assert counts.min() > size / 9 * 0.7


def test_no_augmentation_is_identity_and_scaling_is_exact():
  images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
  images = np.tile(images, (2, 2, 2, 1))
  out = augment.augment_batch({"image": images, "label": np.zeros(2)},
                              np.random.default_rng(0), random_flip=False,
                              crop_padding=0)
  assert out["image"].dtype == np.float32
  assert out["image"].min() == -1.0 and out["image"].max() == 1.0
  np.testing.assert_array_equal(as_uint8(out["image"]), images)


def test_tfds_does_not_register_a_clashing_name():
  assert tfds.builder_cls("cifar100") is not builder.Cifar100Ldm
  with pytest.raises(tfds.core.registered.DatasetNotFoundError):
    tfds.builder_cls(builder.DATASET_NAME)
