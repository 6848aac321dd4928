"""Exponential moving average of parameters: the update, and decay schedules
that stay right at any run length. Pure functions on pytrees."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


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


# ------------------------------------------------------------ decay schedules
#
# A constant decay of 0.9999 started at step 0 keeps 0.9999^N of the random
# initial weights after N steps (61 % after 5,000), so any run shorter than
# ~50k steps would be sampled mostly from noise. The two warm-up schedules
# below make the average follow the weights early and settle to the
# configured length later.

EMA_SCHEDULES = ("constant", "halflife", "power")

DecaySchedule = Callable[[jax.Array], jax.Array]


def power_gamma_from_std(std: float) -> float:
  """EDM2's power-function exponent gamma for a relative width `std`.

  Karras et al. (2024), eq. 3: std^2 = (g + 1) / ((g + 2)^2 (g + 3)), which
  is the cubic std^2 g^3 + 7 std^2 g^2 + (16 std^2 - 1) g + (12 std^2 - 1) = 0;
  its largest real root is the exponent.
  """
  if not 0 < std < 12 ** -0.5:  # g = 0 gives std = 1/sqrt(12), the widest.
    raise ValueError(f"power EMA std must be in (0, {12 ** -0.5:.4f}), got {std}")
  s2 = std * std
  roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
  return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def decay_schedule(kind: str, *, batch_size: int, decay: float = 0.9999,
                   halflife_images: float = 500_000, rampup_ratio: float | None = 0.05,
                   power_std: float = 0.05) -> DecaySchedule:
  """`decay(step)`: the EMA decay applied by the update of 0-based `step`.

  Args:
    kind: "constant": `decay` at every step (the average keeps
      decay^N of the initial weights after N steps: only for long runs).
      "halflife": EDM's (Karras et al. 2022) average whose half-life is
      `halflife_images` training images, but never more than `rampup_ratio`
      times the images seen so far (None: no ramp-up).
      "power": EDM2's power-function average (Karras et al. 2024): decay
      (1 - 1/n)^(gamma + 1) after n updates, with gamma set by `power_std`,
      the width of the average relative to the run's length so far.
    batch_size: global images per step.
    decay: the constant decay.
    halflife_images: the half-life of "halflife" once the ramp-up is over.
    rampup_ratio: the ramp-up of "halflife".
    power_std: the relative width of "power" (EDM2 uses 0.05 to 0.10).
  """
  if kind == "constant":
    if not 0 <= decay <= 1:
      raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    return lambda step: jnp.float32(decay)
  if kind == "halflife":
    if halflife_images <= 0 or (rampup_ratio is not None and rampup_ratio <= 0):
      raise ValueError("EMA halflife_images and rampup_ratio must be positive, got "
                       f"{halflife_images} and {rampup_ratio}")

    def halflife_decay(step):
      halflife = jnp.float32(halflife_images)
      if rampup_ratio is not None:
        images_seen = (jnp.asarray(step, jnp.float32) + 1) * batch_size
        halflife = jnp.minimum(halflife, rampup_ratio * images_seen)
      return jnp.float32(0.5) ** (batch_size / jnp.maximum(halflife, 1e-8))

    return halflife_decay
  if kind == "power":
    exponent = power_gamma_from_std(power_std) + 1

    def power_decay(step):
      updates = jnp.asarray(step, jnp.float32) + 1
      return (1 - 1 / updates) ** exponent

    return power_decay
  raise ValueError(f"unknown EMA schedule {kind!r}; choose from {', '.join(EMA_SCHEDULES)}")
