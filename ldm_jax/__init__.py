"""ldm-jax: class-conditional latent diffusion on CIFAR-100 in JAX and Flax NNX."""

import os as _os

__version__ = "0.1.0"

# XLA:CPU of jaxlib 0.10 hands convolutions to YNNPACK fusions, whose
# convolution weight gradients run 3-8x below the forward convolutions' rate
# (a profile of the UNet step: they were its largest ops). With those
# fusions off, XLA's own kernels make the CPU recipe's VAE step 1.84x and its
# UNet step 1.24x faster (bench/README.md). The flag only changes how XLA:CPU
# compiles; it is set here, before any backend starts, for jaxlib 0.10 only
# (an unknown flag in XLA_FLAGS aborts the process), and never over a
# setting of the user's: set it yourself in XLA_FLAGS to choose otherwise.
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def _default_xla_cpu_flags() -> None:
  from importlib import metadata
  try:
    version = metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    return
  flags = _os.environ.get("XLA_FLAGS", "")
  if version.startswith("0.10.") and _YNN_FLAG not in flags:
    _os.environ["XLA_FLAGS"] = f"{flags} {_YNN_FLAG}=".strip()


_default_xla_cpu_flags()
