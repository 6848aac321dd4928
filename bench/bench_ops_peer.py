"""The issue-8 UNet step's largest ops, one at a time: ldm-jax against ATen.

  JAX_PLATFORMS=cpu python bench/bench_ops_peer.py
  JAX_PLATFORMS=cpu python bench/bench_ops_peer.py --ops=conv --rounds=15

bench_unet_peer.py times whole steps, and its `--without=` option prices a
component by removing it, which also changes what XLA fuses around it. This
script times the ops alone, forward plus backward, at the shapes the step
runs them at (batch 64; 16x16x128, 8x8x256 and 4x4x256 maps, and the two
channel-changing convolutions): the 3x3 convolution's forward, input
gradient and weight gradient, each on its own (XLA:CPU against oneDNN
through ATen), and GroupNorm + SiLU, plain (as the peer's ResBlocks) and
with our FiLM folded in (ours) against ATen's group_norm followed by the
same element-wise ops. JAX runs NHWC, torch NCHW, each its framework's
native layout. Each op alternates between the frameworks for `--rounds`
rounds; the median of each is printed, with the ratio torch_ms / jax_ms
(above 1: ldm-jax is faster).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ldm_jax import huge_pages
from ldm_jax.models import layers

# (batch, height, width, in channels, out channels) of the issue-8 step's
# 3x3 convolutions, and (batch, height, width, channels) of its GroupNorms.
CONV_SHAPES = ((64, 16, 16, 128, 128), (64, 8, 8, 256, 256), (64, 4, 4, 256, 256),
               (64, 8, 8, 128, 256), (64, 16, 16, 256, 128))
NORM_SHAPES = ((64, 16, 16, 128), (64, 8, 8, 256), (64, 4, 4, 256))


def conv_nhwc(x, kernel):
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def jax_conv_ops(shape):
  """{op: thunk} for the forward, input gradient and weight gradient."""
  batch, height, width, cin, cout = shape
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(keys[0], (batch, height, width, cin))
  kernel = jax.random.normal(keys[1], (3, 3, cin, cout)) * 0.05
  grad = jax.random.normal(keys[2], (batch, height, width, cout))
  forward = jax.jit(conv_nhwc)
  input_grad = jax.jit(lambda x, k, g: jax.vjp(lambda x: conv_nhwc(x, k), x)[1](g))
  weight_grad = jax.jit(lambda x, k, g: jax.vjp(lambda k: conv_nhwc(x, k), k)[1](g))
  return {
      "forward": lambda: jax.block_until_ready(forward(x, kernel)),
      "input grad": lambda: jax.block_until_ready(input_grad(x, kernel, grad)),
      "weight grad": lambda: jax.block_until_ready(weight_grad(x, kernel, grad)),
  }


def torch_conv_ops(torch, shape):
  batch, height, width, cin, cout = shape
  x = torch.randn(batch, cin, height, width)
  kernel = torch.randn(cout, cin, 3, 3) * 0.05
  grad = torch.randn(batch, cout, height, width)

  def backward(mask):
    return lambda: torch.ops.aten.convolution_backward(
        grad, x, kernel, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)

  return {
      "forward": lambda: torch.nn.functional.conv2d(x, kernel, padding=1),
      "input grad": backward([True, False, False]),
      "weight grad": backward([False, True, False]),
  }


def jax_norm_ops(shape):
  """GroupNorm + SiLU, forward and backward, plain and with FiLM."""
  batch, channels = shape[0], shape[-1]
  norm = layers.group_norm(channels, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(norm)
  keys = jax.random.split(jax.random.PRNGKey(1), 4)
  x = jax.random.normal(keys[0], shape)
  weights = jax.random.normal(keys[1], shape)
  film = (0.1 * jax.random.normal(keys[2], (batch, channels)),
          0.1 * jax.random.normal(keys[3], (batch, channels)))

  def loss(params, x, film):
    out = nnx.merge(graphdef, params)(x, film)
    return jnp.sum(jax.nn.silu(out) * weights)

  with_film = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  plain = jax.jit(jax.grad(lambda p, x: loss(p, x, None), argnums=(0, 1)))
  return {
      "GroupNorm+SiLU": lambda: jax.block_until_ready(plain(params, x)),
      "GroupNorm+FiLM+SiLU": lambda: jax.block_until_ready(with_film(params, x, film)),
  }


def torch_norm_ops(torch, shape):
  batch, height, width, channels = shape
  norm = torch.nn.GroupNorm(layers.num_groups_for(channels), channels, eps=1e-6)
  x = torch.randn(batch, channels, height, width, requires_grad=True)
  weights = torch.randn(batch, channels, height, width)
  scale = (0.1 * torch.randn(batch, channels, 1, 1)).requires_grad_()
  shift = (0.1 * torch.randn(batch, channels, 1, 1)).requires_grad_()
  silu = torch.nn.functional.silu

  def step(film):
    def run():
      out = norm(x)
      if film:
        out = out * (1 + scale) + shift
      (silu(out) * weights).sum().backward()
    return run

  return {"GroupNorm+SiLU": step(False), "GroupNorm+FiLM+SiLU": step(True)}


def median_ms(run, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def compare(name: str, ours: dict, theirs: dict, rounds: int, repeats: int) -> list[dict]:
  rows = []
  for op in ours:
    for run in (ours[op], theirs[op]):
      run(), run()  # Compile and warm up.
    jax_ms, torch_ms = [], []
    for _ in range(rounds):
      jax_ms.append(median_ms(ours[op], repeats))
      torch_ms.append(median_ms(theirs[op], repeats))
    row = dict(shape=name, op=op, jax_ms=float(np.median(jax_ms)),
               torch_ms=float(np.median(torch_ms)))
    row["ratio"] = row["torch_ms"] / row["jax_ms"]
    print(f"{name:<22} {op:<20} {row['jax_ms']:8.2f} {row['torch_ms']:8.2f} "
          f"{row['ratio']:6.2f}x", flush=True)
    rows.append(row)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ops", default="conv,norm",
                      help="comma-separated: conv, norm")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--repeats", type=int, default=3,
                      help="timed calls per round; each round keeps their median")
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="torch's intra-op threads (default: every core)")
  args = parser.parse_args()
  ops = set(args.ops.split(","))
  if not ops <= {"conv", "norm"}:
    parser.error(f"--ops: unknown {sorted(ops - {'conv', 'norm'})}")
  import torch
  torch.set_num_threads(args.threads)
  print(f"device {jax.devices()[0].device_kind}, torch {torch.__version__} with "
        f"{args.threads} threads, malloc huge pages {huge_pages.enabled()}")
  print(f"{'shape':<22} {'op':<20} {'jax ms':>8} {'torch ms':>8} {'ratio':>7}")
  with torch.no_grad():
    if "conv" in ops:
      for shape in CONV_SHAPES:
        name = "x".join(map(str, shape[1:4])) + f"->{shape[4]}"
        compare(name, jax_conv_ops(shape), torch_conv_ops(torch, shape),
                args.rounds, args.repeats)
  if "norm" in ops:
    for shape in NORM_SHAPES:
      name = "x".join(map(str, shape[1:]))
      compare(name, jax_norm_ops(shape), torch_norm_ops(torch, shape),
              args.rounds, args.repeats)


if __name__ == "__main__":
  huge_pages.reexec_with_huge_pages()
  main()
