"""Feature statistics and the Frechet distance between two Gaussians.

Everything here is float64 numpy on the host: 2048x2048 covariances summed
over tens of thousands of samples lose digits in float32, and FID is a
difference of large traces.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import scipy.linalg

from ldm_jax import files
from ldm_jax.fid.inception import FEATURE_DIM

# Below this many samples the covariance of 2048-d features is singular and
# FID is biased upward; numbers are then only comparable at equal N.
FULL_RANK_SAMPLES = FEATURE_DIM + 1


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(N, D) features -> mean (D,) and unbiased covariance (D, D), float64."""
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(
        f"need at least 2 feature vectors (N, D), got shape {features.shape}")
  mu = features.mean(axis=0)
  centered = features - mu
  sigma = centered.T @ centered / (features.shape[0] - 1)
  return mu, sigma


def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, name: str):
  mu = np.asarray(mu, dtype=np.float64)
  sigma = np.asarray(sigma, dtype=np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(
        f"{name}: mu must be (D,) and sigma (D, D); got {mu.shape} and "
        f"{sigma.shape}")
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f"{name}: statistics contain NaN or inf")
  return mu, sigma


def _drop_rounding_noise(eigenvalues: np.ndarray) -> np.ndarray:
  """Zeroes eigenvalues below the numerical rank cut-off (n * eps * max).

  A singular covariance (fewer samples than dimensions) has ~1e-16 * max
  eigenvalues of either sign instead of zeros; their square roots (~1e-8)
  would add up over hundreds of null directions.
  """
  cutoff = eigenvalues.size * np.finfo(eigenvalues.dtype).eps * max(
      float(np.abs(eigenvalues).max(initial=0.0)), np.finfo(float).tiny)
  return np.where(eigenvalues > cutoff, eigenvalues, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a positive semi-definite matrix."""
  # "evd" (divide and conquer) is the fastest LAPACK driver at 2048x2048.
  eigenvalues, eigenvectors = scipy.linalg.eigh(matrix, driver="evd")
  return (eigenvectors * np.sqrt(_drop_rounding_noise(eigenvalues))
          ) @ eigenvectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """tr(sqrtm(sigma1 @ sigma2)) for covariance matrices, computed stably.

  pytorch-fid takes `scipy.linalg.sqrtm` of the non-symmetric product, then
  patches what goes wrong when it is near-singular (an eps*I offset) and
  drops the spurious imaginary parts. Here the same quantity comes from a
  symmetric problem instead: with A = sqrt(sigma1), sigma1 sigma2 = A (A
  sigma2) has the eigenvalues of (A sigma2) A = A sigma2 A, which is
  symmetric positive semi-definite, so the trace of the square root is the
  sum of the square roots of its (real, >= 0) eigenvalues. That holds for
  singular covariances too (fewer samples than dimensions), where sqrtm is
  least reliable.
  """
  root1 = _psd_sqrt(sigma1)
  middle = root1 @ sigma2 @ root1
  middle = (middle + middle.T) / 2  # remove asymmetric rounding noise
  eigenvalues = scipy.linalg.eigh(middle, eigvals_only=True, driver="evd")
  return float(np.sqrt(_drop_rounding_noise(eigenvalues)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sigma1 sigma2)).
  """
  mu1, sigma1 = _check_gaussian(mu1, sigma1, "first statistics")
  mu2, sigma2 = _check_gaussian(mu2, sigma2, "second statistics")
  if mu1.shape != mu2.shape:
    raise ValueError(
        f"statistics of different dimension: {mu1.shape} vs {mu2.shape}")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * trace_sqrt_product(sigma1, sigma2))


def fid_name(num_samples: int) -> str:
  """'FID-512', 'FID-10k', 'FID-50k': FID is only comparable at equal N."""
  if num_samples >= 1000 and num_samples % 1000 == 0:
    return f"FID-{num_samples // 1000}k"
  return f"FID-{num_samples}"


def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray,
                    **metadata: Any) -> None:
  """Writes `mu`, `sigma` (and JSON metadata) to an .npz, atomically."""
  with files.atomic_write(path, "wb") as f:
    np.savez(f, mu=np.asarray(mu, np.float64),
             sigma=np.asarray(sigma, np.float64),
             metadata=np.array(json.dumps(metadata)))


def load_statistics(path: str, dim: int = FEATURE_DIM
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """Reads an .npz with `mu` (dim,) and `sigma` (dim, dim); checks shapes."""
  with np.load(path, allow_pickle=False) as data:
    if "mu" not in data.files or "sigma" not in data.files:
      raise ValueError(
          f"{path}: not a statistics file (keys {sorted(data.files)}, "
          "expected 'mu' and 'sigma')")
    mu = data["mu"].astype(np.float64)
    sigma = data["sigma"].astype(np.float64)
    metadata = (json.loads(str(data["metadata"]))
                if "metadata" in data.files else {})
  if mu.shape != (dim,) or sigma.shape != (dim, dim):
    raise ValueError(
        f"{path}: statistics of the wrong shape: mu {mu.shape}, sigma "
        f"{sigma.shape}; Inception pool3 statistics are ({dim},) and "
        f"({dim}, {dim})")
  return mu, sigma, metadata
