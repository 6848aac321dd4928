"""`FIDModel`: the Inception with its weights, jit-compiled and data parallel."""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import numpy as np
import tqdm
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from ldm_jax import parallel
from ldm_jax.fid import inception
from ldm_jax.fid import stats
from ldm_jax.fid import weights as weights_lib


@functools.partial(jax.jit, static_argnums=0)
def _features(graphdef: nnx.GraphDef, state: nnx.State,
              images_uint8: jax.Array) -> jax.Array:
  # Resizing on device: only the small uint8 images cross the host link.
  network = nnx.merge(graphdef, state)
  return network(inception.preprocess(images_uint8))


def check_images(images: Any) -> np.ndarray:
  """Returns images as a uint8 (N, H, W, 3) array or raises a clear error."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
        f"expected RGB images of shape (N, H, W, 3), got {images.shape}")
  if images.dtype != np.uint8:
    raise ValueError(
        f"expected uint8 images in [0, 255], got dtype {images.dtype}; "
        "convert e.g. with np.clip(np.round((x + 1) * 127.5), 0, 255)"
        ".astype(np.uint8) for [-1, 1] floats")
  if images.shape[0] == 0:
    raise ValueError("no images")
  return images


class FIDModel:
  """The FID Inception-v3, loaded once and reused.

  Parameters are replicated over the mesh and each batch is split over its
  devices. In a multi-process run every process passes the same images (all
  of them, as the callers have them: generated samples are gathered to every
  host, reference images read by every host); each process feeds only its
  share of every batch, and every process gets back the features of all.
  """

  def __init__(self, params: dict[str, np.ndarray],
               metadata: dict[str, Any] | None = None,
               mesh: Mesh | None = None):
    self.mesh = mesh if mesh is not None else parallel.make_mesh()
    self.metadata = dict(metadata or {})
    self.weights_id = self.metadata.get(
        "checksum") or weights_lib.params_checksum(params)
    # The batch norms are folded into the convolutions once, here: the
    # network that runs has one op per layer fewer (see bench/README.md).
    graphdef, state = inception.abstract_network(folded=True)
    folded = weights_lib.fold_batch_norm(params, inception.BN_EPSILON)
    nested = nnx.State.from_flat_path(
        {tuple(k.split("/")): v for k, v in folded.items()})
    nnx.replace_by_pure_dict(state, nnx.to_pure_dict(nested))
    self._graphdef = graphdef
    self._state = parallel.replicate(self.mesh, state)

  @classmethod
  def load(cls, weights: str | os.PathLike | None = None,
           mesh: Mesh | None = None) -> FIDModel:
    """Loads weights (see `weights.find_weights` for where they are looked
    for); raises `weights.WeightsError` explaining how to get them."""
    path = weights_lib.find_weights(weights)
    params, metadata = weights_lib.load_weights(path)
    logging.info("FID Inception weights: %s (%s)", path,
                 metadata.get("source_kind"))
    return cls(params, dict(metadata, path=path), mesh=mesh)

  def _step_size(self, batch_size: int, num_images: int) -> int:
    """Per-process rows per step: a multiple of the local device count, and
    no bigger than needed for `num_images` (padding is wasted compute)."""
    count = jax.process_count()
    local_devices = self.mesh.devices.size // count
    local = max(1, min(batch_size // count, -(-num_images // count)))
    return -(-local // local_devices) * local_devices

  def features(self, images_uint8: np.ndarray, batch_size: int = 200,
               progress: bool = True) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB images -> (N, 2048) float32 pool3 features.

    `batch_size` (global) is rounded up to a multiple of the device count
    (and down to the number of images); the last batch is padded and the
    padded rows are dropped. Each new step size compiles once.
    """
    images = check_images(images_uint8)
    num_images = images.shape[0]
    global_step = self._step_size(batch_size, num_images) * jax.process_count()
    with tqdm.tqdm(total=num_images, unit="img", desc="FID features",
                   disable=not progress, leave=False) as bar:
      features = parallel.map_in_batches(
          lambda batch: _features(self._graphdef, self._state, batch), images, global_step,
          self.mesh, progress=bar.update)
    return features.astype(np.float32)

  def statistics(self, images_uint8: np.ndarray, batch_size: int = 200,
                 progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of the images' pool3 features."""
    features = self.features(images_uint8, batch_size, progress)
    if features.shape[0] < stats.FULL_RANK_SAMPLES:
      logging.warning(
          "FID statistics from %d samples: the covariance is singular below "
          "%d samples and FID is biased upward; compare only at equal N.",
          features.shape[0], stats.FULL_RANK_SAMPLES)
    return stats.feature_statistics(features)
