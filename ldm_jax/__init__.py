"""ldm-jax: class-conditional latent diffusion on CIFAR-100 in JAX and Flax NNX."""

__version__ = "0.1.0"
