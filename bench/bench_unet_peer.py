"""UNet train step: ldm-jax against the diffusers peer, same machine, one run.

The shape of issue 8: 16x16x4 latents, channels 128 x (1, 2, 2), 2 res
blocks per level, attention at levels 1 and 2, batch 64, AdamW with global
norm clipping, epsilon-prediction MSE, denoiser only (no VAE, no EMA).

  JAX_PLATFORMS=cpu python bench/bench_unet_peer.py                  # both, ratio
  python bench/bench_unet_peer.py --dtype=bfloat16 --no-torch        # an accelerator

The peer is diffusers' `UNet2DModel` with block_out_channels (128, 256, 256),
attention in the two lower-resolution blocks (head dim 64 = 4 heads at 256),
101 class embeddings, dropout 0.1, torch.optim.AdamW + clip_grad_norm_. Both
are timed in `--rounds` interleaved rounds (JAX steps, then torch steps), so
both see the same machine load; the best round and the median are printed.
Each framework's turn starts with `--settle-steps` untimed steps (default 1):
on the 2-core VM, the first JAX step after torch's took 1.5-3.5 s longer
than the next ones, almost all of it kernel time (bench/README.md, round
13), a cost of switching frameworks that a training run never pays.
FLOPs per step come from each framework's own count (XLA's cost analysis,
torch's FlopCounterMode); the machine's matmul rate is measured here with a
jitted float32 (or `--dtype`) 2048^3 matmul. `--peak-tflops` (default: known
accelerators' dense bf16 peak) gives the MFU.

`--without=groupnorm,attention,dropout` also times, in the same rounds, each
model with that component replaced by the identity in both frameworks (every
GroupNorm, every attention block, every dropout), so each component's cost
per step in each framework is the difference to the full step.
Our attention blocks have no MLP by default, like the peer's;
`--attention-mlp-ratio=4` times the latent-diffusion-style block with a 4x
GELU MLP instead:

  JAX_PLATFORMS=cpu python bench/bench_unet_peer.py --rounds=4 --without=groupnorm,attention
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ldm_jax import diffusion, huge_pages, models, train_state
from ldm_jax.kernels import conv as conv_kernels
from ldm_jax.models import layers
from ldm_jax.models.layers import num_groups_for

COMPONENTS = ("groupnorm", "attention", "dropout")

# Dense bf16 peak of accelerators the device check may meet, in TFLOP/s.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0,
                    "TPU v5 lite": 197.0, "TPU v4": 275.0}


def peak_tflops(device_kind: str) -> float | None:
  for name, peak in BF16_PEAK_TFLOPS.items():
    if name.lower() in device_kind.lower():
      return peak
  return None


def matmul_rate(dtype: str, size: int = 2048, repeats: int = 5) -> float:
  """Best achieved GFLOP/s of a jitted size^3 matmul on the default device."""
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(matmul(a, a))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, a))
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best / 1e9


@contextlib.contextmanager
def jax_without(component: str | None):
  """Our layers with `component` replaced by the identity while a step is traced."""
  targets = {"groupnorm": (layers.GroupNorm, lambda self, x, *a, **k: x),
             "attention": (layers.AttentionBlock, lambda self, x, *a, **k: x),
             "dropout": (layers.Dropout, lambda self, x, *a, **k: x)}
  if component not in targets:  # None, or a component removed when the model is built.
    yield
    return
  cls, identity = targets[component]
  original = cls.__call__
  cls.__call__ = identity
  try:
    yield
  finally:
    cls.__call__ = original


def torch_without(model, component: str | None) -> None:
  """The peer with `component` replaced by the identity, module by module."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers.models.attention_processor import Attention  # pylint: disable=g-import-not-at-top
  kinds = {"groupnorm": torch.nn.GroupNorm, "attention": Attention, "dropout": torch.nn.Dropout}
  if component not in kinds:
    return
  for module in model.modules():
    if isinstance(module, kinds[component]):
      module.forward = lambda hidden_states, *a, **k: hidden_states


def jax_step(batch_size: int, dtype: str, channels: int = 128, seed: int = 0,
             without: str | None = None, attention_mlp_ratio: int | None = None):
  """(compiled step, state, batch, FLOPs per step) of our UNet
  (`attention_mlp_ratio` None: the UNet's default)."""
  design = {} if attention_mlp_ratio is None else dict(attention_mlp_ratio=attention_mlp_ratio)

  def build():
    return models.UNet(latent_shape=(16, 16, 4), num_classes=100, channels=channels,
                       channel_multipliers=(1, 2, 2), num_res_blocks=2,
                       attention_levels=(1, 2), num_heads=4, context_dim=256,
                       context_tokens=4, dropout=0.1, dtype=dtype,
                       rngs=nnx.Rngs(params=seed, dropout=seed + 1), **design)

  schedule = diffusion.make_schedule("linear", 1000)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(2e-4))
  # Initialised in one compiled program: eagerly, each initializer is a
  # separate dispatch (minutes for this UNet on a CPU).
  graphdef, _ = nnx.split(nnx.eval_shape(build))
  state = jax.jit(lambda: train_state.create_train_state(build(), tx, seed=seed)[1])()

  def loss_fn(model, frozen, batch, rng):
    del frozen
    per_example = diffusion.diffusion_loss(
        schedule, lambda z_t, t: model(z_t, t, batch["label"]), batch["latent"], rng)
    return jnp.mean(per_example), {}

  step = train_state.make_train_step(graphdef, loss_fn, tx, optax.constant_schedule(2e-4), None)
  rng = np.random.default_rng(seed)
  batch = dict(latent=jnp.asarray(rng.standard_normal((batch_size, 16, 16, 4), np.float32)),
               label=jnp.asarray(rng.integers(0, 100, batch_size), jnp.int32))
  with jax_without(without):
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    # XLA counts no FLOPs in custom calls: count them on the same step with
    # XLA's own convolutions (ldm_jax/kernels/conv.py), uncompiled. A new
    # function, so that jit traces it again rather than reusing the trace.
    with conv_kernels.use_kernel(False):
      cost = jax.jit(lambda *args: step(*args)).lower(state, batch).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return compiled, state, batch, float(cost.get("flops", float("nan")))


def torch_step(batch_size: int, channels: int = 128, seed: int = 0,
               without: str | None = None):
  """(step function, FLOPs per step) of the diffusers UNet2DModel peer."""
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DModel  # pylint: disable=g-import-not-at-top
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = UNet2DModel(
      sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
      block_out_channels=(channels, 2 * channels, 2 * channels),
      down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
      up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
      attention_head_dim=channels // 2, num_class_embeds=101, dropout=0.1,
      norm_num_groups=num_groups_for(channels)).train()
  torch_without(model, without)
  optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.0)
  betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
  alphas_cumprod = torch.cumprod(1 - betas, 0).float()
  generator = torch.Generator().manual_seed(seed)
  x0 = torch.randn(batch_size, 4, 16, 16, generator=generator)
  labels = torch.randint(0, 100, (batch_size,), generator=generator)

  def step():
    t = torch.randint(0, 1000, (batch_size,))
    noise = torch.randn_like(x0)
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    loss = torch.nn.functional.mse_loss(model(x_t, t, class_labels=labels).sample, noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss

  counter = FlopCounterMode(display=False)
  with counter:
    step()
  params = sum(p.numel() for p in model.parameters())
  return step, float(counter.get_total_flops()), params, torch.get_num_threads()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=3, help="steps per round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--settle-steps", type=int, default=1,
                      help="untimed steps at the start of each framework's turn")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--no-torch", action="store_true", help="JAX only")
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="bf16 peak for the MFU (default: known accelerators)")
  parser.add_argument("--unet-channels", type=int, default=128,
                      help="smaller for a quick smoke run of this script")
  parser.add_argument("--without", type=lambda text: [c for c in text.split(",") if c],
                      default=[], help="comma-separated components among "
                      f"{', '.join(COMPONENTS)}: also time both models without each")
  parser.add_argument("--attention-mlp-ratio", type=int, default=None,
                      help="our attention blocks' MLP width ratio (default: the UNet's, none)")
  parser.add_argument("--json", default=None,
                      help="append the numbers as one JSON line here")
  args = parser.parse_args()
  unknown = sorted(set(args.without) - set(COMPONENTS))
  if unknown:
    parser.error(f"--without: unknown {', '.join(unknown)}; choose from {', '.join(COMPONENTS)}")

  device = jax.devices()[0]
  start = time.perf_counter()
  compiled, state, batch, jax_flops = jax_step(args.batch_size, args.dtype,
                                               args.unet_channels,
                                               attention_mlp_ratio=args.attention_mlp_ratio)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f"ldm-jax UNet {params / 1e6:.1f}M params, {args.dtype}, batch {args.batch_size}, "
        f"1 x {device.device_kind}; compile {time.perf_counter() - start:.1f} s; "
        f"{jax_flops / 1e9:.1f} GFLOP/step (XLA); load average {os.getloadavg()[0]:.1f}; "
        f"malloc huge pages (both frameworks) {'on' if huge_pages.enabled() else 'off'}; "
        f"convolutions: {'oneDNN' if conv_kernels.enabled() else 'XLA'} (LDM_JAX_CONV)")
  peer = None
  if not args.no_torch:
    peer_step, torch_flops, torch_params, threads = torch_step(args.batch_size,
                                                               args.unet_channels)
    peer = peer_step
    print(f"diffusers UNet2DModel {torch_params / 1e6:.1f}M params, float32, {threads} "
          f"threads; {torch_flops / 1e9:.1f} GFLOP/step (FlopCounterMode)")
  rate = matmul_rate(args.dtype)
  print(f"machine matmul rate ({args.dtype}, jitted 2048^3): {rate:.0f} GFLOP/s")

  # The full models first, then one pair per --without component; every round
  # times all of them, so that the differences see the same machine load.
  variants = {None: dict(jax=[compiled, state, batch], peer=peer)}
  for component in args.without:
    variants[component] = dict(
        jax=list(jax_step(args.batch_size, args.dtype, args.unet_channels,
                          without=component,
                          attention_mlp_ratio=args.attention_mlp_ratio)[:3]),
        peer=None if args.no_torch else torch_step(args.batch_size, args.unet_channels,
                                                   without=component)[0])
  seconds = {(component, name): [] for component in variants
             for name in ("ldm-jax", "diffusers")}
  for variant in variants.values():  # Warm-up.
    step, state, batch = variant["jax"]
    variant["jax"][1], metrics = step(state, batch)
    jax.block_until_ready(metrics)
    if variant["peer"] is not None:
      variant["peer"]()
  for _ in range(args.rounds):
    for component, variant in variants.items():
      step, state, batch = variant["jax"]
      for _ in range(args.settle_steps):
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
      begin = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      variant["jax"][1] = state
      seconds[component, "ldm-jax"].append((time.perf_counter() - begin) / args.steps)
      if variant["peer"] is not None:
        for _ in range(args.settle_steps):
          variant["peer"]()
        begin = time.perf_counter()
        for _ in range(args.steps):
          variant["peer"]()
        seconds[component, "diffusers"].append((time.perf_counter() - begin) / args.steps)
  rates = {name: [args.batch_size / s for s in seconds[None, name]]
           for name in ("ldm-jax", "diffusers")}

  peak = args.peak_tflops or peak_tflops(device.device_kind)
  flops = {"ldm-jax": jax_flops, "diffusers": peer and torch_flops}
  print(f"{'':10s} {'best img/s':>10s} {'median':>8s} {'GFLOP/s':>8s} {'of matmul':>9s}"
        + (f" {'MFU (bf16 peak)':>15s}" if peak else ""))
  for name, values in rates.items():
    if not values:
      continue
    best = max(values)
    achieved = best / args.batch_size * flops[name] / 1e9
    line = (f"{name:10s} {best:10.2f} {np.median(values):8.2f} {achieved:8.1f} "
            f"{achieved / rate:9.0%}")
    if peak:
      line += f" {achieved / (peak * 1e3):15.1%}"
    print(line)
  if args.json:
    record = dict(bench="unet_step", dtype=args.dtype, device=device.device_kind,
                  batch_size=args.batch_size, matmul_gflops=rate, peak_tflops=peak,
                  malloc_huge_pages=huge_pages.enabled())
    for name, values in rates.items():
      if values:
        record[name] = dict(img_s=max(values), gflop_step=flops[name] / 1e9,
                            gflops=max(values) / args.batch_size * flops[name] / 1e9)
    with open(args.json, "a") as f:
      f.write(json.dumps(record) + "\n")
  if rates["diffusers"]:
    ratios = [a / b for a, b in zip(rates["ldm-jax"], rates["diffusers"])]
    print(f"ldm-jax / diffusers: {max(rates['ldm-jax']) / max(rates['diffusers']):.2f}x "
          f"(best vs best); per round {', '.join(f'{r:.2f}' for r in ratios)}")
  if args.without:
    print("\ncost of each component per step (median of the full step minus median "
          "without it; s/step)")
    print(f"{'without':14s} {'ldm-jax':>8s} {'cost':>6s} {'diffusers':>9s} {'cost':>6s}")
    full = {name: np.median(seconds[None, name]) if seconds[None, name] else np.nan
            for name in ("ldm-jax", "diffusers")}
    for component in [None] + list(args.without):
      line = f"{component or '(nothing)':14s}"
      for name in ("ldm-jax", "diffusers"):
        median = np.median(seconds[component, name]) if seconds[component, name] else np.nan
        cost = "" if component is None else f"{full[name] - median:6.2f}"
        line += f" {median:8.2f} {cost:>6s}" if name == "ldm-jax" else f" {median:9.2f} {cost:>6s}"
      print(line)


if __name__ == "__main__":
  huge_pages.reexec_with_huge_pages()  # Time what train.py gets.
  main()
