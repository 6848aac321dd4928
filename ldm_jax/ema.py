"""Exponential moving average of parameters, as a pure function on pytrees."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def ema_update(ema_params: Any, params: Any, decay: float | jax.Array) -> Any:
  """One EMA step: decay * ema + (1 - decay) * params, leaf by leaf.

  Args:
    ema_params: the running average, a pytree (e.g. an `nnx.State`).
    params: the current parameters, the same structure.
    decay: in [0, 1]; may be a traced scalar, e.g. for a warm-up schedule.

  Returns:
    The new average, with the structure and dtypes of `ema_params`. Leaves
    that are not floating point (step counters, RNG keys) are not averaged:
    they take the current value from `params`.
  """

  def update(ema: jax.Array, param: jax.Array) -> jax.Array:
    if not jnp.issubdtype(jnp.result_type(param), jnp.inexact):
      return param
    # Cast back so that the average keeps its own dtype (e.g. float32 for
    # bfloat16 parameters) and a jitted training loop its carry types.
    return (decay * ema + (1 - decay) * param).astype(jnp.result_type(ema))

  return jax.tree.map(update, ema_params, params)
