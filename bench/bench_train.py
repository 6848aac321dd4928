"""Training throughput of a recipe: compiled train steps per second.

  python bench/bench_train.py --config=configs/cifar100_vae.py --batch_size=64
  python bench/bench_train.py --config=configs/cifar100_ldm.py
  python bench/bench_train.py --config=configs/cifar100_cpu.py --stage=ldm   # a main-job stage

Times the real jit-compiled train step of the loop (on all devices, with the
state donated) on random batches, after a warm-up step that compiles it. An
LDM recipe gets a freshly initialised VAE of its default architecture as its
frozen encoder (a main-job recipe: its own VAE stage's architecture); the
VAE's weights do not change the cost. With the LDM's latent cache on
(`--config.ldm_stage.ldm.cache_latents=True` on a main job) the step takes
cached posteriors instead of images, so the encoder does not run, and the
rate at which the cache is built is printed too.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from configs import cifar100_vae
from ldm_jax import huge_pages, parallel, pipeline, runs

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cifar100_vae.py", "Recipe.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Global batch (default: the recipe's).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps.")
_CACHE_IMAGES = 2_000
_STAGE = flags.DEFINE_enum("stage", "ldm", ["vae", "ldm"], "Stage of a main-job recipe to time.")


def frozen_for(config, mesh, vae_config=None):
  if config.stage != "ldm":
    return None
  vae_config = vae_config or cifar100_vae.get_config()
  with config.unlocked():
    config.vae = vae_config.vae
  vae_stage = runs.make_stage(vae_config)
  _, vae_state = runs.init_train_state(vae_stage, vae_config, None, parallel.replicated(mesh))
  return dict(vae=dict(params=vae_state.params, rest=vae_state.rest),
              latent_scale=jnp.float32(1.0))


def cache_rate(stage, frozen, mesh, rng, num_images=_CACHE_IMAGES) -> None:
  """Prints how fast the latent cache is built (images encoded per second)."""
  images = rng.integers(0, 256, (num_images, stage.config.data.image_size,
                                 stage.config.data.image_size, 3), dtype=np.uint8)
  stage.posteriors(frozen["vae"], images[:stage.config.eval.batch_size], mesh)  # Compiles.
  start = time.perf_counter()
  stage.posteriors(frozen["vae"], images, mesh)
  elapsed = time.perf_counter() - start
  print(f"  latent cache: {num_images / elapsed:.1f} images/s encoded; both orientations of "
        f"50,000 train images would take {100_000 * elapsed / num_images:.0f} s")


def main(argv):
  del argv
  config, vae_config = _CONFIG.value, None
  if config.stage == "pipeline":
    # Each stage as the main job runs it (with the job's data settings); the
    # workdir only names the VAE checkpoint, which is not read here.
    stages = {name: c for name, _, c in pipeline.stage_configs(config, "unused")}
    vae_config, config = stages["vae"], stages[_STAGE.value]
  batch_size = _BATCH_SIZE.value or config.train.batch_size
  mesh = parallel.make_mesh()
  parallel.check_batch_size(batch_size, mesh)
  frozen = frozen_for(config, mesh, vae_config)
  stage = runs.make_stage(config)
  graphdef, state = runs.init_train_state(stage, config, frozen, parallel.replicated(mesh))
  step, _ = runs.compile_steps(stage, config, mesh, graphdef, state)
  rng = np.random.default_rng(0)
  size = config.data.image_size
  labels = rng.integers(0, config.data.num_classes, batch_size).astype(np.int32)
  if config.stage == "ldm" and config.ldm.get("cache_latents"):
    # What the latent cache hands the step: posteriors, not images.
    *spatial, channels = stage.latent_shape
    batch = dict(posterior=rng.normal(size=(batch_size, *spatial, 2 * channels)).astype(
        np.float32), label=labels)
    cache_rate(stage, frozen, mesh, rng)
  else:
    batch = dict(image=rng.uniform(-1, 1, (batch_size, size, size, 3)).astype(np.float32),
                 label=labels)
  batch = parallel.shard_batch(mesh, batch)
  params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f"{config.stage} ({params / 1e6:.1f}M params), global batch {batch_size}, "
        f"{mesh.devices.size} x {jax.devices()[0].device_kind}; "
        f"malloc huge pages {'on' if huge_pages.enabled() else 'off'}")
  start = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  print(f"  compile + first step: {time.perf_counter() - start:.1f} s")
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  elapsed = time.perf_counter() - start
  print(f"  {_STEPS.value / elapsed:.3f} steps/s, {_STEPS.value * batch_size / elapsed:.1f} "
        f"images/s ({elapsed / _STEPS.value:.2f} s/step)")


if __name__ == "__main__":
  huge_pages.reexec_with_huge_pages()  # Time what train.py gets.
  app.run(main)
