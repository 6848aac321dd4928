"""bf16 mixed precision: bfloat16 compute, float32 parameters, state and loss."""

import json
import os

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from conftest import vae_config
from ldm_jax import data, parallel, runs, train_loop, train_state
from test_ldm import ldm_config


def conv_dtypes(fn, *args):
  """Input dtypes of every convolution in the traced program of fn(*args)."""
  jaxpr = jax.make_jaxpr(fn)(*args)
  found = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        found.add(str(eqn.invars[0].aval.dtype))
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            walk(sub)

  walk(jaxpr.jaxpr)
  return found


def test_bf16_train_step_matches_float32_loss_and_keeps_float32_state(tiny_data_dir):
  batch = None
  results = {}
  for dtype in ("float32", "bfloat16"):
    config = vae_config(tiny_data_dir, compute_dtype=dtype)
    if batch is None:
      batch = next(data.train_iterator(config.data, config.train.batch_size, seed=0))
    stage = runs.make_stage(config)
    mesh = parallel.make_mesh(1)
    graphdef, state = runs.init_model_and_state(stage, config, frozen=None)
    state = parallel.replicate(mesh, state)
    tx = train_state.make_optimizer(config.optim, config.train.num_steps)
    schedule = train_state.learning_rate_schedule(config.optim, config.train.num_steps)
    step, _ = train_state.compile_steps(
        mesh, graphdef, state,
        train_state.make_train_step(graphdef, stage.loss, tx, schedule, None),
        train_state.make_eval_step(graphdef, stage.eval_metrics))
    sharded = parallel.shard_batch(mesh, batch)
    losses = []
    for _ in range(2):
      state, metrics = step(state, sharded)
      losses.append(float(metrics["loss"]))
    float_leaves = [x for x in jax.tree.leaves((state.params, state.opt_state))
                    if jnp.issubdtype(x.dtype, jnp.floating)]
    assert {x.dtype for x in float_leaves} == {jnp.dtype(jnp.float32)}, dtype
    assert metrics["loss"].dtype == jnp.float32
    results[dtype] = np.array(losses)
  assert np.all(np.isfinite(results["bfloat16"]))
  # The two runs see the same weights and batch: bf16 rounding only.
  np.testing.assert_allclose(results["bfloat16"], results["float32"], rtol=0.02)
  assert not np.array_equal(results["bfloat16"], results["float32"])  # bf16 really ran.


def test_tiny_bf16_ldm_trains_and_samples(tiny_data_dir, vae_workdir, tmp_path):
  config = ldm_config(tiny_data_dir, vae_workdir, num_steps=2)
  config.train.compute_dtype = "bfloat16"
  workdir = str(tmp_path / "ldm_bf16")
  train_loop.train_and_evaluate(config, workdir)

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [row["train/loss"] for row in map(json.loads, f) if "train/loss" in row]
  assert losses and np.all(np.isfinite(losses))

  saved, graphdef, state = runs.load_run(workdir)
  assert saved["train"]["compute_dtype"] == "bfloat16"
  for tree in (state.params, state.ema_params, state.opt_state):
    floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}
  # Sampling rebuilds the denoiser and the VAE from the saved config: bf16 too.
  denoiser = nnx.merge(graphdef, state.ema_params, state.rest)
  denoiser.eval()
  z = jnp.zeros((2,) + tuple(denoiser.latent_shape))
  assert conv_dtypes(lambda z: denoiser(z, jnp.array([1, 2]), jnp.array([0, 1])), z) == {
      "bfloat16"}
  stage = runs.make_stage(ml_collections.ConfigDict(saved))
  vae = nnx.merge(stage.vae_graphdef, state.frozen["vae"]["params"], state.frozen["vae"]["rest"])
  assert conv_dtypes(vae.decode, z) == {"bfloat16"}
  # The eval of the run sampled with it (DDIM, guidance) into its picture.
  picture = np.asarray(Image.open(os.path.join(workdir, "samples.png")))
  assert picture.ndim == 3 and picture.std() > 0
