"""The train state and the compiled steps that every stage shares.

The model lives as NNX state inside a plain pytree, and the steps are pure
functions of it compiled with `jax.jit`: the graph definition is split off once,
so each step costs no Python graph traversal, and the state can be donated,
sharded and checkpointed like any other pytree.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from ldm_jax import ema as ema_lib
from ldm_jax import parallel
from ldm_jax.stages import base


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State  # What the optimizer trains.
  rest: nnx.State  # Other model variables (dropout RNG streams).
  opt_state: optax.OptState
  ema_params: nnx.State | None  # None when the stage keeps no average.
  frozen: Any  # Arrays the loss needs but never trains (the LDM's VAE).
  rng: jax.Array  # Base key; step s uses fold_in(rng, s), so resuming is exact.

  def eval_params(self) -> nnx.State:
    """EMA parameters where kept: they are what one evaluates and samples with."""
    return self.params if self.ema_params is None else self.ema_params


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=optim.learning_rate,
      warmup_steps=min(optim.warmup_steps, max(num_steps - 1, 0)),
      decay_steps=max(num_steps, 1),
      end_value=optim.learning_rate * optim.final_learning_rate_fraction)


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int,
                   clip_separately: tuple[str, ...] = ()) -> optax.GradientTransformation:
  """AdamW with warmup + cosine decay, after clipping the global gradient norm.

  `clip_separately` names top-level parameter groups (an adversarial critic)
  whose gradients are clipped by their own norm: a clip shared with the model
  would let the critic's gradients shrink the model's steps, or the reverse.
  AdamW is per parameter, so nothing else differs.
  """
  def clip_and_adamw():
    return optax.chain(
        optax.clip_by_global_norm(optim.grad_clip_norm),
        optax.adamw(learning_rate_schedule(optim, num_steps), b1=optim.b1, b2=optim.b2,
                    weight_decay=optim.weight_decay))
  if not clip_separately:
    return clip_and_adamw()
  rest = "rest"
  if rest in clip_separately:
    raise ValueError(f"{rest!r} cannot name a separately clipped group")

  def group_labels(params: nnx.State):
    def label(path, _):
      return path[0].key if path[0].key in clip_separately else rest
    return jax.tree_util.tree_map_with_path(label, params)
  return optax.multi_transform(
      {name: clip_and_adamw() for name in (*clip_separately, rest)}, group_labels)


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, *,
                       seed: int, frozen: Any = None, keep_ema: bool = False
                       ) -> tuple[nnx.GraphDef, TrainState]:
  """Splits `model` into its graph definition and a fresh train state."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  state = TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      rest=rest,
      opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params) if keep_ema else None,
      frozen={} if frozen is None else frozen,
      rng=jax.random.PRNGKey(seed))
  return graphdef, state


# A stage's loss: (model, frozen, batch, rng) -> (scalar loss, {name: scalar}).
LossFn = Callable[[nnx.Module, Any, dict, jax.Array], tuple[jax.Array, dict]]
# A stage's eval: (model, frozen, batch, rng) -> {name: per-example (B,) values}.
EvalFn = Callable[[nnx.Module, Any, dict, jax.Array], dict]


def with_step(batch: dict, step: jax.Array) -> dict:
  """The train batch as a stage's loss receives it: with the step being taken
  (base.STEP), for terms that switch on during training."""
  return dict(batch, **{base.STEP: step})


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: optax.Schedule,
                    ema_decay: Callable[[jax.Array], jax.Array] | None):
  """(state, batch) -> (state, metrics), the one update rule of every stage.

  `ema_decay(step)` gives the decay of the parameter average at each step.
  """

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_and_rest(params):
      # copy=True: the RNG counters of dropout are advanced inside this grad
      # trace, and NNX allows that only on variables created in it.
      model = nnx.merge(graphdef, params, state.rest, copy=True)
      model.train()
      loss, metrics = loss_fn(model, state.frozen, with_step(batch, state.step), rng)
      _, _, rest = nnx.split(model, nnx.Param, ...)
      return loss, (metrics, rest)

    (loss, (metrics, rest)), grads = jax.value_and_grad(loss_and_rest, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if ema_params is not None:
      decay = ema_decay(state.step)
      ema_params = ema_lib.ema_update(ema_params, params, decay)
      metrics = dict(metrics, ema_decay=decay)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                   learning_rate=schedule(state.step))
    new_state = state.replace(step=state.step + 1, params=params, rest=rest,
                              opt_state=opt_state, ema_params=ema_params)
    return new_state, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, eval_fn: EvalFn):
  """(state, batch, batch_number) -> sums of each per-example metric over the real rows.

  `batch_number` (the batch's place in the eval pass) is folded into the
  key, so every eval batch draws its own noise and timesteps: with one key
  for the whole pass, each batch would repeat the first one's draws, and a
  1,000-example eval would average over only one batch's worth of them.

  The key does not depend on the step: every eval of a run, and of any run
  with the same seed, draws the same noise and timesteps for the same
  examples, so eval losses compare between steps and between runs without
  the draw's own spread (two LDMs logged 0.194 and 0.217 from 1,000
  examples at steps 3,500 and 4,150; with one key, on 10,000, both 0.2060).
  """

  def eval_step(state: TrainState, batch: dict, batch_number: jax.Array) -> dict:
    model = nnx.merge(graphdef, state.eval_params(), state.rest)
    model.eval()
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, 0x5EED), batch_number)
    per_example = eval_fn(model, state.frozen, batch, rng)
    mask = batch["mask"]
    sums = {k: jnp.sum(jnp.where(mask > 0, v, 0.0)) for k, v in per_example.items()}
    sums["count"] = jnp.sum(mask)
    return sums

  return eval_step


def compile_steps(mesh, graphdef, state_like, train_step, eval_step):
  """jit both steps with the layout fixed: state replicated, batches split."""
  replicated = parallel.replicated(mesh)
  state_sharding = jax.tree.map(lambda _: replicated, state_like)
  batch_sharding = parallel.batch_sharding(mesh)
  train = jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                  out_shardings=(state_sharding, replicated), donate_argnums=0)
  evaluate = jax.jit(eval_step, in_shardings=(state_sharding, batch_sharding, replicated),
                     out_shardings=replicated)
  return train, evaluate
