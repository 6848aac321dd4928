"""ldm-jax: class-conditional latent diffusion on CIFAR-100 in JAX and Flax NNX."""

import os as _os

__version__ = "0.1.0"

# XLA:CPU of jaxlib 0.10 hands convolutions, dots, element-wise ops and
# reductions to YNNPACK fusions. Its convolution weight gradients run 3-8x
# below the forward convolutions' rate (a profile of the UNet step: they were
# its largest ops); with all YNNPACK fusions off, the CPU recipe's VAE step
# ran 1.84x and its UNet step 1.24x faster. XLA's own reductions, though, sum
# the positions of an NHWC map one channel at a time, 10-25x slower than
# YNNPACK's (bias, GroupNorm and FiLM gradients are such sums), so reductions
# alone stay with YNNPACK: the issue-8 UNet step gains about 1.10x more
# (bench/README.md, rounds 4 and 8). The flag only changes how XLA:CPU
# compiles; it is set here, before any backend starts, for jaxlib 0.10 only
# (an unknown flag in XLA_FLAGS aborts the process), and never over a
# setting of the user's: set it yourself in XLA_FLAGS to choose otherwise.
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
_YNN_FUSION_TYPES = "reduce"


def _default_xla_cpu_flags() -> None:
  from importlib import metadata
  try:
    version = metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    return
  flags = _os.environ.get("XLA_FLAGS", "")
  if version.startswith("0.10.") and _YNN_FLAG not in flags:
    _os.environ["XLA_FLAGS"] = (
        f"{flags} {_YNN_FLAG}={_YNN_FUSION_TYPES}".strip())


_default_xla_cpu_flags()
