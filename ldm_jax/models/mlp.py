"""Residual MLP denoiser for flat (vector) latents.

The original project's "simplified" model: pre-LayerNorm residual blocks of
Dense + SiLU over the flattened latent, conditioned on time and class by
adding their projected embedding inside each block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ldm_jax.models.layers import Dropout, small_init, timestep_embedding


class MLPBlock(nnx.Module):
  """x + Dense(Dropout(SiLU(Dense(LayerNorm(x)) + proj(cond))))."""

  def __init__(
      self, hidden_dim: int, emb_dim: int, *, dropout: float = 0.0,
      dtype=jnp.float32, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(hidden_dim, dtype=dtype, rngs=rngs)
    self.dense_in = nnx.Linear(hidden_dim, hidden_dim, dtype=dtype, rngs=rngs)
    self.emb_proj = nnx.Linear(emb_dim, hidden_dim, dtype=dtype, rngs=rngs)
    # Built even at rate 0 so `nnx.view(model, deterministic=...)` always
    # finds the switch it sets.
    self.dropout = Dropout(dropout, rngs=rngs)
    self.dense_out = nnx.Linear(hidden_dim, hidden_dim, dtype=dtype,
                                rngs=rngs)

  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    h = self.dense_in(self.norm(x)) + self.emb_proj(jax.nn.silu(emb))
    h = self.dropout(jax.nn.silu(h))
    return x + self.dense_out(h)


class MLPDenoiser(nnx.Module):
  """Denoiser ``model(z_t, t, labels)`` over latents of any shape, flattened.

  Labels are (B,) ints in [0, num_classes]; `num_classes` is the learned null
  class for classifier-free guidance. `dtype` is the compute dtype
  (parameters stay float32); the output is float32.
  """

  def __init__(
      self,
      *,
      latent_shape: Sequence[int] = (128,),
      num_classes: int = 100,
      hidden_dim: int = 1024,
      num_blocks: int = 4,
      emb_dim: int = 256,
      dropout: float = 0.0,
      dtype: str | jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    dtype = jnp.dtype(dtype)
    latent_shape = tuple(latent_shape)
    if not latent_shape or min(latent_shape) < 1:
      raise ValueError(f"latent_shape must be non-empty and positive, got "
                       f"{latent_shape}")
    for name, value in (("num_classes", num_classes),
                        ("hidden_dim", hidden_dim), ("num_blocks", num_blocks),
                        ("emb_dim", emb_dim)):
      if value < 1:
        raise ValueError(f"{name} must be positive, got {value}")
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {dropout}")

    self.latent_shape = latent_shape
    self.num_classes = num_classes
    self.emb_dim = emb_dim
    latent_size = math.prod(latent_shape)

    self.time_in = nnx.Linear(emb_dim, emb_dim, dtype=dtype, rngs=rngs)
    self.time_out = nnx.Linear(emb_dim, emb_dim, dtype=dtype, rngs=rngs)
    # num_classes + 1 rows: the last one is the learned null class.
    self.class_embed = nnx.Embed(num_classes + 1, emb_dim, dtype=dtype,
                                 rngs=rngs)
    self.dense_in = nnx.Linear(latent_size, hidden_dim, dtype=dtype,
                               rngs=rngs)
    self.blocks = nnx.List([
        MLPBlock(hidden_dim, emb_dim, dropout=dropout, dtype=dtype, rngs=rngs)
        for _ in range(num_blocks)])
    self.out_norm = nnx.LayerNorm(hidden_dim, dtype=dtype, rngs=rngs)
    self.dense_out = nnx.Linear(
        hidden_dim, latent_size, kernel_init=small_init, dtype=dtype,
        rngs=rngs)

  def __call__(
      self, z_t: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
    """Denoiser output, same shape as z_t (B, *latent_shape)."""
    batch = z_t.shape[0]
    emb = timestep_embedding(t, self.emb_dim)
    emb = self.time_out(jax.nn.silu(self.time_in(emb)))
    emb = emb + self.class_embed(labels)
    h = self.dense_in(z_t.reshape(batch, -1))
    for block in self.blocks:
      h = block(h, emb)
    out = self.dense_out(jax.nn.silu(self.out_norm(h))).reshape(z_t.shape)
    return out.astype(jnp.float32)  # The loss and samplers stay float32.
