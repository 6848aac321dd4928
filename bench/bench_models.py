"""Forward+backward throughput of the default models on the local devices.

Prints jitted steps/s (after warm-up) at batch 64 for the default VAE
(channels=64, multipliers (1, 2), 2 res blocks, 16x16x4 latent), the default
UNet on 16x16x4 latents and the default MLP denoiser on 128-d latents, and
compares nearest-resize+conv with ConvTranspose for one 2x upsampling layer.
`groupnorm` times GroupNorm + SiLU forward and backward (from a given output
gradient, no loss) at the models' shapes, and torch's when it is installed.

  PYTHONPATH=. python bench/bench_models.py [--batch 64] [--steps 5] [--only vae,unet,...]
  python bench/bench_models.py --only groupnorm --steps 10
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import os as _os
import sys as _sys

# Runnable as `python bench/<name>.py` from the repository root.
_sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

from ldm_jax import huge_pages
from ldm_jax.models import (
    VAE, MLPDenoiser, UNet, gaussian_kl, reconstruction_loss)
from ldm_jax.models.layers import Upsample, group_norm


def _steps_per_second(step: Callable, args: tuple, steps: int) -> float:
  jax.block_until_ready(step(*args))  # compile + warm-up
  start = time.perf_counter()
  for _ in range(steps):
    out = step(*args)
  jax.block_until_ready(out)
  return steps / (time.perf_counter() - start)


def _grad_step(model: nnx.Module, loss_fn: Callable) -> tuple[Callable, object]:
  """A jitted grad of `loss_fn(model, *inputs)` over the model's params."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def step(params, *inputs):
    def loss(params):
      return loss_fn(nnx.merge(graphdef, params, rest, copy=True), *inputs)
    return jax.value_and_grad(loss)(params)

  return step, params


def bench_vae(batch: int, steps: int) -> float:
  model = VAE(rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, 32, 32, 3)),
                  jnp.float32)

  def loss_fn(vae, x, rng):
    x_hat, mean, logvar = vae(x, rng)
    return (reconstruction_loss(x_hat, x) + 1e-6 * gaussian_kl(mean, logvar)
            ).mean()

  step, params = _grad_step(model, loss_fn)
  return _steps_per_second(step, (params, x, jax.random.key(0)), steps)


def _bench_denoiser(model: nnx.Module, batch: int, steps: int) -> float:
  latent_shape = model.latent_shape
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal((batch,) + latent_shape), jnp.float32)
  t = jnp.asarray(rng.integers(1, 1000, batch), jnp.int32)
  labels = jnp.asarray(rng.integers(0, 101, batch), jnp.int32)

  def loss_fn(denoiser, z, t, labels):
    return jnp.mean((denoiser(z, t, labels) - z) ** 2)

  step, params = _grad_step(nnx.view(model, deterministic=False), loss_fn)
  return _steps_per_second(step, (params, z, t, labels), steps)


def bench_upsampling(batch: int, steps: int, channels: int = 128,
                     size: int = 16) -> tuple[float, float]:
  """Forward+backward steps/s: nearest+conv vs ConvTranspose (stride 2)."""
  x = jnp.asarray(
      np.random.default_rng(0).standard_normal((batch, size, size, channels)),
      jnp.float32)
  results = []
  for layer in (
      Upsample(channels, rngs=nnx.Rngs(0)),
      nnx.ConvTranspose(channels, channels, (4, 4), strides=(2, 2),
                        rngs=nnx.Rngs(0)),
  ):
    step, params = _grad_step(layer, lambda m, x: jnp.mean(m(x) ** 2))
    results.append(_steps_per_second(step, (params, x), steps))
  return tuple(results)


def _best_ms(step: Callable, args: tuple, steps: int) -> float:
  """Best wall time of `step(*args)` in ms, after one warm-up call (JAX or torch)."""
  jax.block_until_ready(step(*args))
  best = float("inf")
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(step(*args))
    best = min(best, time.perf_counter() - start)
  return best * 1e3


def bench_groupnorm(batch: int, steps: int,
                    shapes=((16, 128), (8, 256), (4, 256), (16, 384), (32, 64), (32, 128))):
  """Best ms of GroupNorm(32) + SiLU forward and backward, ours (layers.GroupNorm)
  and torch's, plain and with a FiLM scale and shift: ours folds it into the
  normalisation, torch applies it as `norm(x) * (1 + s) + t`."""
  rows = []
  for size, channels in shapes:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, size, size, channels)).astype(np.float32)
    grad = rng.standard_normal(x.shape).astype(np.float32)
    film = 0.1 * rng.standard_normal((2, batch, channels)).astype(np.float32)
    graphdef, params = nnx.split(group_norm(channels, rngs=nnx.Rngs(0)))

    def forward_backward(params, x, grad, film=None):
      # Gradients for the input and the parameters from a given output gradient:
      # no loss, whose own reduction would be timed too.
      forward = lambda params, x, film: jax.nn.silu(nnx.merge(graphdef, params)(
          x, None if film is None else tuple(film)))
      return jax.vjp(forward, params, x, film)[1](grad)

    args = (params, jnp.asarray(x), jnp.asarray(grad))
    step = jax.jit(forward_backward)
    times = {"jax": _best_ms(step, args, steps),
             "jax film": _best_ms(step, args + (jnp.asarray(film),), steps)}
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      times["torch"] = times["torch film"] = float("nan")
    else:
      norm = torch.nn.GroupNorm(32, channels, eps=1e-6)
      xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
      gt = torch.from_numpy(grad).permute(0, 3, 1, 2).contiguous()
      scale, shift = (torch.from_numpy(f)[:, :, None, None].requires_grad_(True)
                      for f in film)

      def torch_step(with_film):
        out = norm(xt) * (1 + scale) + shift if with_film else norm(xt)
        torch.nn.functional.silu(out).backward(gt)

      times["torch"] = _best_ms(torch_step, (False,), steps)
      times["torch film"] = _best_ms(torch_step, (True,), steps)
    rows.append(((batch, size, size, channels), times))
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--only", default="vae,unet,mlp,upsample")
  args = parser.parse_args()
  wanted = set(args.only.split(","))
  print(f"devices: {jax.devices()}  batch {args.batch}  "
        f"(forward+backward, jit, after warm-up)")
  if "vae" in wanted:
    print(f"VAE (64ch, (1,2), 2 res, 16x16x4): "
          f"{bench_vae(args.batch, args.steps):.2f} steps/s", flush=True)
  if "unet" in wanted:
    rate = _bench_denoiser(UNet(rngs=nnx.Rngs(0)), args.batch, args.steps)
    print(f"UNet (default, 16x16x4): {rate:.2f} steps/s", flush=True)
  if "mlp" in wanted:
    rate = _bench_denoiser(MLPDenoiser(rngs=nnx.Rngs(0)), args.batch,
                           args.steps)
    print(f"MLPDenoiser (default, 128): {rate:.2f} steps/s", flush=True)
  if "groupnorm" in wanted:
    print("GroupNorm(32) + SiLU, forward and backward, best ms (plain; with FiLM):")
    for shape, times in bench_groupnorm(args.batch, args.steps):
      print(f"  {'x'.join(map(str, shape)):14s} jax {times['jax']:6.2f}  "
            f"torch {times['torch']:6.2f}  ({times['torch'] / times['jax']:.2f}x);  "
            f"jax {times['jax film']:6.2f}  torch {times['torch film']:6.2f}  "
            f"({times['torch film'] / times['jax film']:.2f}x)", flush=True)
  if "upsample" in wanted:
    nearest, transpose = bench_upsampling(args.batch, args.steps)
    print(f"2x upsample 16->32, 128ch: nearest+conv3x3 {nearest:.2f} steps/s, "
          f"ConvTranspose4x4/2 {transpose:.2f} steps/s "
          f"(ratio {nearest / transpose:.2f}x)", flush=True)


if __name__ == "__main__":
  huge_pages.reexec_with_huge_pages()  # Time what train.py gets.
  main()
