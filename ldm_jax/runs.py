"""Runs as objects on disk: build a stage from a config, load a workdir back.

A workdir holds `checkpoints/` (ldm_jax.checkpoint) whose every step carries
the config it was trained with, so a run can be rebuilt from the workdir
alone: this is how the LDM finds its VAE and how sample.py finds the LDM.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
from flax import nnx

from ldm_jax import checkpoint, parallel, train_state
from ldm_jax.stages import base, ldm, vae

STAGES = ("vae", "ldm")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def make_stage(config: ml_collections.ConfigDict) -> base.Stage:
  if config.stage == "vae":
    return vae.VAEStage(config)
  if config.stage == "ldm":
    return ldm.LDMStage(config, load_vae=load_run)
  raise ValueError(f"unknown stage {config.stage!r}; expected one of {STAGES}")


def init_model_and_state(stage: base.Stage, config, frozen: Any
                         ) -> tuple[nnx.GraphDef, train_state.TrainState]:
  """A freshly initialised model, split into its graph and a train state."""
  model = stage.build_model(nnx.Rngs(params=config.seed, dropout=config.seed + 1))
  tx = train_state.make_optimizer(config.optim, config.train.num_steps,
                                  stage.clip_separately)
  return train_state.create_train_state(
      model, tx, seed=config.seed, frozen=frozen, keep_ema=stage.ema_schedule is not None)


def init_train_state(stage: base.Stage, config, frozen: Any, sharding
                     ) -> tuple[nnx.GraphDef, train_state.TrainState]:
  """Like `init_model_and_state`, but compiled: run eagerly, each initializer
  is an op-by-op dispatch (over a minute for the UNet on CPU), while one jit
  program builds all of it in a second, directly in place on the devices."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: stage.build_model(nnx.Rngs(0))))
  build = jax.jit(lambda frozen: init_model_and_state(stage, config, frozen)[1],
                  out_shardings=sharding)
  return graphdef, build(frozen)


def compile_steps(stage: base.Stage, config, mesh, graphdef: nnx.GraphDef, state_like):
  """The stage's jitted (train_step, eval_step) under the config's optimiser."""
  tx = train_state.make_optimizer(config.optim, config.train.num_steps,
                                  stage.clip_separately)
  schedule = train_state.learning_rate_schedule(config.optim, config.train.num_steps)
  return train_state.compile_steps(
      mesh, graphdef, state_like,
      train_state.make_train_step(graphdef, stage.loss, tx, schedule, stage.ema_schedule),
      train_state.make_eval_step(graphdef, stage.eval_metrics))


def abstract_train_state(stage: base.Stage, config, sharding
                         ) -> tuple[nnx.GraphDef, train_state.TrainState]:
  """The state's layout, with no array allocated: the target of a restore."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: stage.build_model(nnx.Rngs(0))))
  state = jax.eval_shape(lambda: init_model_and_state(stage, config, None)[1])
  state = state.replace(frozen=stage.init_frozen(None))
  return graphdef, checkpoint.abstract_like(state, sharding)


def _existing_step(checkpointer: checkpoint.Checkpointer, step: int | None) -> int:
  step = checkpointer.latest_step() if step is None else step
  if step is None or step not in checkpointer.all_steps():
    raise FileNotFoundError(
        f"no checkpoint {'at all' if step is None else f'for step {step}'} in "
        f"{checkpointer.directory}; saved steps: {checkpointer.all_steps()}")
  return step


def _open_checkpoints(workdir: str) -> checkpoint.Checkpointer:
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{workdir} holds no checkpoints (expected {directory}/)")
  return checkpoint.Checkpointer(directory, read_only=True)


def load_config(workdir: str, step: int | None = None) -> dict:
  """The config a run was trained with, read without loading its weights."""
  with _open_checkpoints(workdir) as checkpointer:
    return checkpointer.restore_config(_existing_step(checkpointer, step))


def load_run(workdir: str, step: int | None = None, mesh=None
             ) -> tuple[dict, nnx.GraphDef, train_state.TrainState]:
  """(saved config, model graphdef, train state) of a trained run.

  `step=None` takes the latest checkpoint. The state is replicated over
  `mesh` (default: all devices), whatever device count it was saved from.
  """
  mesh = mesh or parallel.make_mesh()
  with _open_checkpoints(workdir) as checkpointer:
    step = _existing_step(checkpointer, step)
    saved = checkpointer.restore_config(step)
    config = ml_collections.ConfigDict(saved)
    stage = make_stage(config)
    graphdef, abstract = abstract_train_state(stage, config, parallel.replicated(mesh))
    state = checkpointer.restore(step, abstract)
  return saved, graphdef, state


def load_params(workdir: str, step: int | None, mesh=None, *, ema: bool = True):
  """The model parameters of checkpoint `step` (None: the latest) of a run,
  its EMA ones if `ema`: e.g. the guide of autoguidance."""
  _, _, state = load_run(workdir, step, mesh)
  return state.eval_params() if ema else state.params


def attach_vae_config(config: ml_collections.ConfigDict) -> None:
  """Copies the VAE's architecture from `config.vae_checkpoint` into an LDM
  config, after checking the VAE is what this LDM needs."""
  if config.stage != "ldm" or "vae" in config:
    return
  if not config.get("vae_checkpoint"):
    raise ValueError("an LDM run needs --config.vae_checkpoint=<workdir of a trained VAE>")
  vae_config = load_config(config.vae_checkpoint, config.get("vae_step"))
  where = f"the VAE checkpoint in {config.vae_checkpoint}"
  if vae_config.get("stage") != "vae":
    raise ValueError(f"{where} is a {vae_config.get('stage')!r} run, not a VAE")
  model = vae_config["vae"]["model"]
  if model["latent"] != config.ldm.latent:
    raise ValueError(
        f"{where} has a {model['latent']!r} latent, but the {config.ldm.denoiser!r} denoiser "
        f"of this config needs a {config.ldm.latent!r} one (config.ldm.latent)")
  if model["image_size"] != config.data.image_size:
    raise ValueError(f"{where} was trained on {model['image_size']}px images, "
                     f"this config uses {config.data.image_size}px")
  with config.unlocked():
    config.vae = ml_collections.ConfigDict(vae_config["vae"])
