"""What a training stage is: the parts of training that differ between stages.

The loop (ldm_jax/train_loop.py) owns everything else: data, devices, the
update rule, metrics, checkpoints, resumption. A stage supplies its model, its
loss, its per-example eval metrics and the picture written at each eval.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from flax import nnx

# The key under which the loop gives `Stage.loss` the step being taken.
STEP = "step"


class Stage(abc.ABC):
  """One kind of training run (the VAE, the latent diffusion model)."""

  # Name of the picture written to the workdir at each eval.
  picture_name: str = "picture.png"

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  @property
  def ema_schedule(self) -> Callable[[jax.Array], jax.Array] | None:
    """`decay(step)` of the parameter average kept in the state; None keeps none."""
    return None

  @property
  def clip_separately(self) -> tuple[str, ...]:
    """Top-level parameter groups whose gradient norm is clipped on its own."""
    return ()

  @abc.abstractmethod
  def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
    """The trained model, freshly initialised."""

  def init_frozen(self, batches: Iterator[dict] | None) -> Any:
    """Untrained arrays the loss needs (may read a few `batches`), or {}.

    With `batches=None` it must still return a tree of the right structure
    (abstract values are fine): it is used to lay out a restore.
    """
    del batches
    return {}

  def prepare_training(self, frozen: Any, mesh: Any) -> None:
    """Work done once per start, when the frozen arrays are in place and
    before the first step (e.g. caches `train_batch` reads)."""
    del frozen, mesh

  def train_batch(self, batch: dict) -> dict:
    """The host-side train batch the loss takes, from what the stream gives."""
    return batch

  @abc.abstractmethod
  def loss(self, model: nnx.Module, frozen: Any, batch: dict,
           rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar loss to minimise, and scalar metrics to log.

    `batch[STEP]` is the step being taken.
    """

  @abc.abstractmethod
  def eval_metrics(self, model: nnx.Module, frozen: Any, batch: dict,
                   rng: jax.Array) -> dict[str, jax.Array]:
    """Per-example (B,) metrics; `loss` among them picks the best checkpoint."""

  @abc.abstractmethod
  def picture(self, graphdef: nnx.GraphDef, state: Any, batch: dict) -> np.ndarray:
    """A uint8 (H, W, 3) picture of what the model does on `batch` (host side)."""

  def fid_images(self, graphdef: nnx.GraphDef, state: Any, batches: Iterator[dict],
                 num_images: int) -> np.ndarray:
    """uint8 NHWC images to score with FID during training."""
    raise NotImplementedError(f"{type(self).__name__} has no FID images")
