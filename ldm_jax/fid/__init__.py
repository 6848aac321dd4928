"""FID for ldm-jax: pytorch-fid's protocol on a Flax port of its Inception.

Typical use::

  from ldm_jax import fid
  model = fid.FIDModel.load()              # weights: see fid.weights
  mu, sigma = model.statistics(images_uint8)
  value = fid.frechet_distance(mu, sigma, *fid.reference_statistics(cfg.data))
  # or simply: fid.fid_against_reference(images_uint8, cfg.data)

Command line: ``python -m ldm_jax.fid --help``.
"""

from __future__ import annotations

from ldm_jax.fid.extractor import FIDModel
from ldm_jax.fid.reference import fid_against_reference, reference_statistics
from ldm_jax.fid.stats import (
    feature_statistics,
    fid_name,
    frechet_distance,
    load_statistics,
    save_statistics,
)
from ldm_jax.fid.weights import WeightsError, convert_weights

__all__ = [
    "FIDModel",
    "WeightsError",
    "convert_weights",
    "feature_statistics",
    "fid_against_reference",
    "fid_name",
    "frechet_distance",
    "load_statistics",
    "reference_statistics",
    "save_statistics",
]
