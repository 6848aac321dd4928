"""Flax NNX models: the VAE and the latent denoisers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import nnx

from ldm_jax.models.mlp import MLPDenoiser
from ldm_jax.models.unet import UNet
from ldm_jax.models.vae import VAE, gaussian_kl, psnr, reconstruction_loss

DENOISERS: dict[str, type[nnx.Module]] = {"unet": UNet, "mlp": MLPDenoiser}


def make_denoiser(
    name: str,
    *,
    latent_shape: Sequence[int],
    num_classes: int,
    rngs: nnx.Rngs,
    **kwargs: Any,
) -> nnx.Module:
  """Builds the denoiser registered under `name` ('unet' or 'mlp').

  `latent_shape` and `num_classes` come from the VAE and the data set; the
  remaining architecture options are passed through as keyword arguments.
  """
  if name not in DENOISERS:
    raise ValueError(
        f"unknown denoiser {name!r}; valid names: {sorted(DENOISERS)}")
  return DENOISERS[name](
      latent_shape=tuple(latent_shape), num_classes=num_classes, rngs=rngs,
      **kwargs)


__all__ = [
    "DENOISERS", "MLPDenoiser", "UNet", "VAE", "gaussian_kl",
    "make_denoiser", "psnr", "reconstruction_loss",
]
