"""Reference statistics of the real data, and FID of samples against them.

The field reports CIFAR FID against the statistics of all 50,000 training
images; those are computed once per (dataset, split, weights) and cached.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from absl import logging

from ldm_jax.fid import stats
from ldm_jax.fid import weights as weights_lib
from ldm_jax.fid.extractor import FIDModel

_MODELS: dict[str, FIDModel] = {}


def cached_model(weights: str | os.PathLike | None = None) -> FIDModel:
  """One `FIDModel` per weights file per process: loading and compiling the
  Inception takes long, and training asks for FID again and again."""
  path = os.path.abspath(weights_lib.find_weights(weights))
  if path not in _MODELS:
    _MODELS[path] = FIDModel.load(path)
  return _MODELS[path]


def reference_statistics_path(data_config: ml_collections.ConfigDict,
                              split: str, weights_id: str) -> str:
  """<cache>/fid_stats/<dataset>-<split>-<weights checksum prefix>.npz.

  The weights' checksum is part of the name because statistics from other
  weights (or another port) are not comparable.
  """
  return os.path.join(
      weights_lib.cache_dir(), "fid_stats",
      f"{data_config.name}-{split}-{weights_id[:12]}.npz")


def reference_statistics(data_config: ml_collections.ConfigDict,
                         split: str = "train",
                         weights: str | os.PathLike | None = None, *,
                         model: FIDModel | None = None,
                         batch_size: int = 200, progress: bool = True,
                         recompute: bool = False
                         ) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of every image of `split`, computed once and cached.

  Images come from the prepared dataset (`ldm_jax.data.load_split_images`).
  `model` (default: the cached one for `weights`) computes the features.
  """
  model = model or cached_model(weights)
  path = reference_statistics_path(data_config, split, model.weights_id)
  if os.path.exists(path) and not recompute:
    mu, sigma, _ = stats.load_statistics(path)
    return mu, sigma
  from ldm_jax import data  # pylint: disable=g-import-not-at-top
  data.ensure_prepared(data_config)
  images, _ = data.load_split_images(data_config, split)
  logging.info("FID reference statistics: %d %s images of %s", len(images),
               split, data_config.name)
  mu, sigma = model.statistics(images, batch_size=batch_size,
                               progress=progress)
  if jax.process_index() == 0:
    stats.save_statistics(
        path, mu, sigma, dataset=data_config.name, split=split,
        num_images=int(len(images)), weights=model.weights_id)
  return mu, sigma


def fid_against_reference(images_uint8: np.ndarray,
                          data_config: ml_collections.ConfigDict,
                          split: str = "train",
                          weights: str | os.PathLike | None = None, *,
                          model: FIDModel | None = None,
                          batch_size: int = 200,
                          progress: bool = True,
                          reference: str | os.PathLike | None = None) -> float:
  """FID of generated uint8 NHWC images against the real `split`.

  `reference`, a statistics .npz (`stats.save_statistics`, or pytorch-fid's
  mu/sigma files), replaces the cached statistics of `split`.

  Report it with its sample count (`stats.fid_name(len(images_uint8))`):
  FID is biased by N, so FID-512 and FID-50k are different numbers.
  """
  model = model or cached_model(weights)
  if reference is not None:
    mu_ref, sigma_ref, _ = stats.load_statistics(os.fspath(reference))
  else:
    mu_ref, sigma_ref = reference_statistics(
        data_config, split, weights, model=model, batch_size=batch_size,
        progress=progress)
  mu, sigma = model.statistics(images_uint8, batch_size=batch_size,
                               progress=progress)
  return stats.frechet_distance(mu, sigma, mu_ref, sigma_ref)
