"""The VAE's adversarial term: the critic's losses, the balance of the two
gradients, where each gradient goes, the critic's own clipping, and an LDM
trained on an adversarial VAE run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ldm_config, vae_config
from ldm_jax import config as config_lib, runs, train_loop, train_state
from ldm_jax.models import critic as critic_lib
from ldm_jax.models import vae as vae_lib
from ldm_jax.stages import base
from ldm_jax.stages import vae as vae_stage


def test_hinge_losses_at_known_logits():
  confident = critic_lib.critic_hinge_loss(jnp.full((2, 4, 4), 3.0), jnp.full((2, 4, 4), -1.5))
  np.testing.assert_allclose(confident, [0.0, 0.0])
  undecided = critic_lib.critic_hinge_loss(jnp.zeros((2, 4, 4)), jnp.zeros((2, 4, 4)))
  np.testing.assert_allclose(undecided, [1.0, 1.0])
  # Per example and per patch: one real patch at 0 (loss 1) of 4 in example 1
  # only; fake logits of 0.5 everywhere (loss 1.5 each).
  real = jnp.ones((2, 2, 2)).at[1, 0, 0].set(0.0)
  np.testing.assert_allclose(critic_lib.critic_hinge_loss(real, jnp.full((2, 2, 2), 0.5)),
                             [0.5 * 1.5, 0.5 * (0.25 + 1.5)])
  np.testing.assert_allclose(
      critic_lib.generator_loss(jnp.arange(8.0).reshape(2, 2, 2)), [-1.5, -5.5])


def test_balanced_direction_has_the_asked_norm_along_the_critics_gradient():
  rng = np.random.default_rng(0)
  reconstruction_grad = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
  adversarial_grad = jnp.asarray(100 * rng.normal(size=(4, 8, 8, 3)), jnp.float32)
  direction = critic_lib.balanced_adversarial_direction(reconstruction_grad, adversarial_grad, 0.3)
  norm = lambda g: float(jnp.sqrt(jnp.sum(g ** 2)))
  np.testing.assert_allclose(norm(direction), 0.3 * norm(reconstruction_grad), rtol=1e-5)
  cosine = jnp.sum(direction * adversarial_grad) / (norm(direction) * norm(adversarial_grad))
  np.testing.assert_allclose(cosine, 1.0, rtol=1e-5)
  assert not np.any(critic_lib.balanced_adversarial_direction(
      reconstruction_grad, adversarial_grad, 0.0))


def test_patch_critic_gives_one_logit_per_patch():
  critic = critic_lib.PatchCritic(channels=8, levels=2, rngs=nnx.Rngs(0))
  logits = critic(jnp.zeros((3, 32, 32, 3)))
  assert logits.shape == (3, 8, 8) and logits.dtype == jnp.float32
  with pytest.raises(ValueError, match="levels"):
    critic_lib.PatchCritic(levels=0, rngs=nnx.Rngs(0))


def adversarial_config(tiny_data_dir, start_step=5, weight=0.5):
  config = vae_config(tiny_data_dir)
  config.vae.adversarial.update(weight=weight, start_step=start_step, critic_channels=8)
  return config


def split_grads(grads):
  critic = grads[vae_stage.CRITIC]
  return vae_stage.autoencoder_state(grads), critic


def test_each_part_of_the_loss_trains_only_its_own_parameters(tiny_data_dir):
  config = adversarial_config(tiny_data_dir, start_step=5)
  stage = vae_stage.VAEStage(config)
  model = stage.build_model(nnx.Rngs(0))
  assert isinstance(model, vae_stage.VAEWithCritic)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
  rng = jax.random.PRNGKey(1)

  def grads_at(step):
    def loss(params):
      return stage.loss(nnx.merge(graphdef, params, rest), {}, {"image": x, base.STEP: step}, rng)[0]
    return split_grads(jax.grad(loss)(params))

  # The autoencoder's loss alone, and the critic's hinge loss alone.
  def autoencoder_loss(params):
    model = nnx.merge(graphdef, params, rest)
    x_hat, mean, logvar = model(x, rng)
    per_example = (vae_lib.reconstruction_loss(x_hat, x, "l1")
                   + config.vae.kl_weight * vae_lib.gaussian_kl(mean, logvar))
    return jnp.mean(per_example)

  def critic_loss(params):
    model = nnx.merge(graphdef, params, rest)
    x_hat = jax.lax.stop_gradient(model(x, rng)[0])
    return critic_lib.critic_hinge_loss(model.critic(x), model.critic(x_hat)).mean()

  expected_autoencoder, _ = split_grads(jax.grad(autoencoder_loss)(params))
  _, expected_critic = split_grads(jax.grad(critic_loss)(params))
  close = lambda a, b: jax.tree.map(
      lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-4, atol=1e-7), a, b)

  before_autoencoder, before_critic = grads_at(4)
  close(before_autoencoder, expected_autoencoder)  # Before start_step: no adversarial term.
  close(before_critic, expected_critic)
  after_autoencoder, after_critic = grads_at(5)
  close(after_critic, expected_critic)  # The decoder's term never reaches the critic.
  # ...but it does reach the autoencoder: the decoder's output conv moves.
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                       after_autoencoder, before_autoencoder)
  assert moved["dec_out"]["kernel"].value > 1e-4 * float(
      jnp.max(jnp.abs(before_autoencoder["dec_out"]["kernel"].value)))


def test_separately_clipped_group_leaves_the_rest_as_without_it():
  optim = config_lib.base_config().optim
  optim.update(learning_rate=1e-2, warmup_steps=0, grad_clip_norm=1.0)
  params = nnx.State({"critic": {"w": jnp.ones(3)}, "dec": {"w": jnp.ones(3)}})
  # A huge critic gradient, then small ones everywhere. Adam's first step is
  # scale-free, so the clip shows in the second: a shared clip shrinks the
  # first dec gradient 1e4-fold, and the second then dominates its moments.
  steps = [nnx.State({"critic": {"w": jnp.full(3, 1e3)}, "dec": {"w": jnp.full(3, 0.1)}}),
           nnx.State({"critic": {"w": jnp.full(3, 0.1)}, "dec": {"w": jnp.full(3, -0.1)}})]

  def second_update(tx, keys):
    select = lambda tree: nnx.State({key: tree[key] for key in keys})
    opt_state = tx.init(select(params))
    for grads in steps:
      updates, opt_state = tx.update(select(grads), opt_state, select(params))
    return np.asarray(updates["dec"]["w"])

  alone = second_update(train_state.make_optimizer(optim, 10), ["dec"])
  separate = second_update(train_state.make_optimizer(optim, 10, clip_separately=("critic",)),
                           ["critic", "dec"])
  shared = second_update(train_state.make_optimizer(optim, 10), ["critic", "dec"])
  np.testing.assert_allclose(separate, alone, rtol=1e-6)
  assert np.all(np.abs(shared - alone) > 0.1 * np.abs(alone))
  with pytest.raises(ValueError, match="rest"):
    train_state.make_optimizer(optim, 10, clip_separately=("rest",))


def test_adversarial_vae_run_and_an_ldm_on_it(tiny_data_dir, tmp_path):
  vae_dir, ldm_dir = str(tmp_path / "vae"), str(tmp_path / "ldm")
  train_loop.train_and_evaluate(adversarial_config(tiny_data_dir, start_step=5), vae_dir)
  _, _, state = runs.load_run(vae_dir)
  assert vae_stage.CRITIC in state.params
  assert np.isfinite(float(jnp.sum(state.params[vae_stage.CRITIC]["to_logits"]["kernel"].value)))
  config = ldm_config(tiny_data_dir, vae_dir, num_steps=2)
  train_loop.train_and_evaluate(config, ldm_dir)
  _, _, ldm_state = runs.load_run(ldm_dir)
  frozen_params = ldm_state.frozen["vae"]["params"]
  assert vae_stage.CRITIC not in frozen_params
  by_path = lambda tree: {jax.tree_util.keystr(path): np.asarray(leaf)
                         for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
  frozen_leaves = by_path(frozen_params)
  autoencoder_leaves = by_path(vae_stage.autoencoder_state(state.params))
  assert frozen_leaves.keys() == autoencoder_leaves.keys()
  for path, leaf in frozen_leaves.items():
    np.testing.assert_array_equal(leaf, autoencoder_leaves[path], err_msg=path)


def test_vae_runs_saved_before_the_adversarial_term_and_norm_groups_still_resume(tiny_data_dir):
  config = vae_config(tiny_data_dir)
  saved = config_lib.to_json(config)
  # As written before the keys existed: no critic, 32 groups per GroupNorm.
  del saved["vae"]["adversarial"]
  del saved["vae"]["model"]["norm_groups"]
  assert config_lib.incompatible_keys(saved, config) == []
  config.vae.adversarial.weight = 0.1
  config.vae.model.norm_groups = 8
  assert config_lib.incompatible_keys(saved, config) == [
      "vae.adversarial.weight", "vae.model.norm_groups"]
