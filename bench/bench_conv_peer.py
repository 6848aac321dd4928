"""The issue-8 UNet step's 3x3 convolutions, one at a time: ours against ATen.

  JAX_PLATFORMS=cpu python bench/bench_conv_peer.py
  JAX_PLATFORMS=cpu python bench/bench_conv_peer.py --rounds=15

bench_unet_peer.py times whole steps, and its `--without=` option prices a
component by removing it, which also changes what XLA fuses around it. This
script times the convolutions alone, at the shapes the step runs them at
(batch 64; 16x16x128, 8x8x256 and 4x4x256 maps, and the two
channel-changing convolutions): the forward pass, the input gradient and
the weight gradient, each on its own, in two JAX forms: XLA:CPU's own
convolution, and the one the models run (`ldm_jax/kernels/conv.py`: oneDNN
through XLA's FFI, when it builds), against oneDNN through ATen. JAX runs
NHWC, torch NCHW, each its framework's native layout. Each op alternates
between the three for `--rounds` rounds; the median of each is printed, with
the ratios torch_ms / jax_ms (above 1: ldm-jax is faster). GroupNorm's
counterpart is `bench_models.py --only groupnorm`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from ldm_jax import huge_pages
from ldm_jax.kernels import conv as conv_kernels

# (batch, height, width, in channels, out channels) of the issue-8 step's
# 3x3 convolutions.
CONV_SHAPES = ((64, 16, 16, 128, 128), (64, 8, 8, 256, 256), (64, 4, 4, 256, 256),
               (64, 8, 8, 128, 256), (64, 16, 16, 256, 128))


def conv_nhwc(x, kernel):
  return conv_kernels.conv_general_dilated(
      x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def jax_conv_ops(shape, onednn: bool):
  """{op: thunk} for the forward, input gradient and weight gradient, with
  XLA's convolution or the oneDNN kernel."""
  with conv_kernels.use_kernel(onednn):
    return _jax_conv_ops(shape)


def _jax_conv_ops(shape):
  batch, height, width, cin, cout = shape
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(keys[0], (batch, height, width, cin))
  kernel = jax.random.normal(keys[1], (3, 3, cin, cout)) * 0.05
  grad = jax.random.normal(keys[2], (batch, height, width, cout))
  # Compiled here, so that the kernel choice of the caller applies.
  forward = jax.jit(lambda x, k: conv_nhwc(x, k)).lower(x, kernel).compile()
  input_grad = jax.jit(lambda x, k, g: jax.vjp(lambda x: conv_nhwc(x, k), x)[1](g)
                       ).lower(x, kernel, grad).compile()
  weight_grad = jax.jit(lambda x, k, g: jax.vjp(lambda k: conv_nhwc(x, k), k)[1](g)
                        ).lower(x, kernel, grad).compile()
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


def median_ms(run, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def compare(name: str, xla: dict, onednn: dict, theirs: dict, rounds: int,
            repeats: int) -> None:
  for op in theirs:
    runs = (xla[op], onednn[op], theirs[op])
    for run in runs:
      run(), run()  # Warm up.
    times = [[], [], []]
    for _ in range(rounds):
      for run, record in zip(runs, times):
        record.append(median_ms(run, repeats))
    xla_ms, onednn_ms, torch_ms = (float(np.median(t)) for t in times)
    print(f"{name:<22} {op:<12} {xla_ms:8.2f} {onednn_ms:8.2f} {torch_ms:8.2f} "
          f"{torch_ms / xla_ms:6.2f}x {torch_ms / onednn_ms:6.2f}x", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--repeats", type=int, default=3,
                      help="timed calls per round; each round keeps their median")
  parser.add_argument("--threads", type=int, default=os.cpu_count(),
                      help="torch's intra-op threads (default: every core)")
  args = parser.parse_args()
  import torch
  torch.set_num_threads(args.threads)
  print(f"device {jax.devices()[0].device_kind}, torch {torch.__version__} with "
        f"{args.threads} threads, malloc huge pages {huge_pages.enabled()}")
  kernel_error = conv_kernels.kernel_error()
  if kernel_error:
    print(f"oneDNN kernel unavailable ({kernel_error}): its column repeats XLA's")
  print(f"{'shape':<22} {'op':<12} {'xla ms':>8} {'onednn':>8} {'torch ms':>8} "
        f"{'xla':>7} {'onednn':>7}   (ratios: torch ms / ours)")
  with torch.no_grad():
    for shape in CONV_SHAPES:
      name = "x".join(map(str, shape[1:4])) + f"->{shape[4]}"
      compare(name, jax_conv_ops(shape, False), jax_conv_ops(shape, True),
              torch_conv_ops(torch, shape), args.rounds, args.repeats)


if __name__ == "__main__":
  huge_pages.reexec_with_huge_pages()
  main()
