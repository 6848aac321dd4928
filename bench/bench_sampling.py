"""Sampler throughput with a real denoiser; prints numbers, asserts nothing.

  python bench/bench_sampling.py [--denoiser=unet|mlp] [--batch=64]
      [--runs=ddpm:1000,ddim:50,dpm_solver:20] [--guidance=2.0]

Builds an untrained denoiser with `ldm_jax.models.make_denoiser` (weights do
not change the cost), then times one jitted, classifier-free guided sampling
program per sampler on a batch sharded over all devices. Reports compile
time, images/s and milliseconds per sampler step. A full-size UNet at
ddpm:1000 takes hours on a CPU: there, pass e.g. --runs=dpm_solver:20.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags

import os as _os
import sys as _sys

# Runnable as `python bench/<name>.py` from the repository root.
_sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

from ldm_jax import diffusion, huge_pages, parallel

_DENOISER = flags.DEFINE_enum("denoiser", "unet", ["unet", "mlp"],
                              "Which ldm_jax.models denoiser to time.")
_BATCH = flags.DEFINE_integer("batch", 64, "Images per sampling batch.")
_RUNS = flags.DEFINE_list("runs", ["ddpm:1000", "ddim:50", "dpm_solver:20"],
                          "sampler:num_steps pairs to time.")
_GUIDANCE = flags.DEFINE_float("guidance", 2.0, "Classifier-free guidance.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs; the best counts.")
_LATENT_SHAPE = flags.DEFINE_list(
    "latent_shape", None, "Latent shape; default 16,16,4 (unet), 128 (mlp).")

_DEFAULT_LATENT_SHAPES = {"unet": (16, 16, 4), "mlp": (128,)}
NUM_CLASSES = 100  # CIFAR-100; label NUM_CLASSES is the null class.


def benchmark_samplers(
    model_fn: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array],
    latent_shape: Sequence[int], batch: int, *, variables: Any = None,
    runs: Sequence[tuple[str, int]] = (
        ("ddpm", 1000), ("ddim", 50), ("dpm_solver", 20)),
    guidance: float = 2.0, num_classes: int = NUM_CLASSES,
    schedule: diffusion.Schedule | None = None,
    repeats: int = 2) -> dict[str, dict[str, float]]:
  """Times guided sampling of `batch` latents with each (sampler, steps).

  Args:
    model_fn: `model_fn(variables, z_t, t, labels) -> output`. The weights
      come in as `variables`, a jit argument, rather than through a closure,
      which would bake them into the program as constants.
    latent_shape: the shape of one latent.
    batch: latents per sampling call; must divide over the devices.
    variables: the pytree handed to `model_fn`, replicated on every device.
    runs: (sampler name, num_steps) pairs, in the order to time them.
    guidance: classifier-free guidance weight (2 model calls per step unless
      it is 0 or 1).
    num_classes: labels cycle through 0..num_classes-1; `num_classes` is the
      null label.
    schedule: defaults to the linear 1000-step schedule.
    repeats: timed executions per run after compilation; the fastest counts.

  Returns:
    {"sampler-steps": {"compile_s", "seconds", "images_per_s",
    "ms_per_step"}} for each run.
  """
  schedule = schedule or diffusion.make_schedule()
  mesh = parallel.make_mesh()
  parallel.check_batch_size(batch, mesh)
  labels = jax.device_put(
      np.arange(batch, dtype=np.int32) % num_classes,
      parallel.batch_sharding(mesh))
  variables = parallel.replicate(mesh, variables)
  results = {}
  for sampler, num_steps in runs:

    def run(variables, labels, rng, sampler=sampler, num_steps=num_steps):
      noise_rng, sampler_rng = jax.random.split(rng)
      z_T = jax.random.normal(noise_rng, (batch,) + tuple(latent_shape))
      guided = diffusion.guided_model_fn(
          lambda z_t, t, y: model_fn(variables, z_t, t, y), labels,
          num_classes, guidance)
      return diffusion.sample(sampler, guided, schedule, z_T, sampler_rng,
                              num_steps=num_steps)

    start = time.perf_counter()
    compiled = jax.jit(run).lower(variables, labels,
                                  jax.random.key(0)).compile()
    compile_s = time.perf_counter() - start
    seconds = []
    for repeat in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(compiled(variables, labels, jax.random.key(repeat)))
      seconds.append(time.perf_counter() - start)
    best = min(seconds)
    results[f"{sampler}-{num_steps}"] = dict(
        compile_s=compile_s, seconds=best, images_per_s=batch / best,
        ms_per_step=best / num_steps * 1e3)
  return results


def main(argv: list[str]) -> None:
  del argv
  from flax import nnx  # Only the script needs the models, not the function.

  from ldm_jax import models

  name = _DENOISER.value
  latent_shape = (tuple(int(d) for d in _LATENT_SHAPE.value)
                  if _LATENT_SHAPE.value else _DEFAULT_LATENT_SHAPES[name])
  denoiser = models.make_denoiser(name, latent_shape=latent_shape,
                                  num_classes=NUM_CLASSES, rngs=nnx.Rngs(0))
  denoiser.eval()  # No dropout while sampling.
  graphdef, state = nnx.split(denoiser)
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(denoiser,
                                                             nnx.Param)))

  def model_fn(state, z_t, t, labels):
    return nnx.merge(graphdef, state)(z_t, t, labels)

  runs = []
  for run in _RUNS.value:
    sampler, _, steps = run.partition(":")
    runs.append((sampler, int(steps)))
  print(f"{name} denoiser, {num_params / 1e6:.1f}M parameters, latent "
        f"{latent_shape}, batch {_BATCH.value}, guidance {_GUIDANCE.value}, "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}")
  results = benchmark_samplers(
      model_fn, latent_shape, _BATCH.value, variables=state, runs=runs,
      guidance=_GUIDANCE.value, repeats=_REPEATS.value)
  for run, r in results.items():
    print(f"{run:>16}: {r['images_per_s']:9.2f} images/s "
          f"({r['ms_per_step']:8.2f} ms/step, {r['seconds']:8.2f} s/batch, "
          f"compile {r['compile_s']:.1f} s)")


if __name__ == "__main__":
  huge_pages.reexec_with_huge_pages()  # Time what train.py gets.
  app.run(main)
