"""Training throughput of a recipe: compiled train steps per second.

  python bench/bench_train.py --config=configs/cifar100_vae.py --batch_size=64
  python bench/bench_train.py --config=configs/cifar100_ldm.py
  python bench/bench_train.py --config=configs/cifar100_cpu.py --stage=ldm   # a main-job stage

Times the real jit-compiled train step of the loop (on all devices, with the
state donated) on random batches, after a warm-up step that compiles it. An
LDM recipe gets a freshly initialised VAE of its default architecture as its
frozen encoder (a main-job recipe: its own VAE stage's architecture); the
VAE's weights do not change the cost.
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
from ldm_jax import parallel, runs

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cifar100_vae.py", "Recipe.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Global batch (default: the recipe's).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps.")
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


def main(argv):
  del argv
  config, vae_config = _CONFIG.value, None
  if config.stage == "pipeline":
    vae_config = config.vae_stage
    config = config.vae_stage if _STAGE.value == "vae" else config.ldm_stage
  batch_size = _BATCH_SIZE.value or config.train.batch_size
  mesh = parallel.make_mesh()
  parallel.check_batch_size(batch_size, mesh)
  frozen = frozen_for(config, mesh, vae_config)
  stage = runs.make_stage(config)
  graphdef, state = runs.init_train_state(stage, config, frozen, parallel.replicated(mesh))
  step, _ = runs.compile_steps(stage, config, mesh, graphdef, state)
  rng = np.random.default_rng(0)
  size = config.data.image_size
  batch = parallel.shard_batch(mesh, dict(
      image=rng.uniform(-1, 1, (batch_size, size, size, 3)).astype(np.float32),
      label=rng.integers(0, config.data.num_classes, batch_size).astype(np.int32)))
  params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f"{config.stage} ({params / 1e6:.1f}M params), global batch {batch_size}, "
        f"{mesh.devices.size} x {jax.devices()[0].device_kind}")
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
  app.run(main)
