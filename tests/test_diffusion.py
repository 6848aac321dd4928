"""Tests for ldm_jax.diffusion and ldm_jax.ema, with analytic models only.

The sampler tests use Gaussian data, x0 ~ N(mu, diag(std^2)), for which the
optimal denoiser is known in closed form: with x_t = a x0 + s eps,
  E[eps | x_t] = s (x_t - a mu) / (a^2 std^2 + s^2),
  E[x0 | x_t] = mu + a std^2 (x_t - a mu) / (a^2 std^2 + s^2),
and the probability-flow ODE maps x_T to mu + std (x_T - a_T mu) / r_T with
r_T^2 = a_T^2 std^2 + s_T^2, which gives deterministic samplers an exact
answer to converge to.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ldm_jax import diffusion, parallel
from ldm_jax.ema import ema_update

DATA_MEAN = jnp.array([1.0, -2.0])
DATA_STD = jnp.array([0.5, 1.5])


@functools.cache
def linear_schedule(num_timesteps: int = 1000) -> diffusion.Schedule:
  return diffusion.make_schedule("linear", num_timesteps)


def _alpha_sigma(schedule, t, ndim):
  abar = schedule.alphas_cumprod[t - 1].reshape((-1,) + (1,) * (ndim - 1))
  return jnp.sqrt(abar), jnp.sqrt(1 - abar)


@functools.cache
def gaussian_model(num_timesteps: int = 1000, prediction: str = "eps"):
  """A cached `gaussian_model_fn`, so jitted samplers reuse compilations."""
  return gaussian_model_fn(linear_schedule(num_timesteps), prediction)


def gaussian_model_fn(schedule, prediction="eps", mean=DATA_MEAN,
                      std=DATA_STD):
  """The exact minimiser of the diffusion loss for N(mean, diag(std^2))."""

  def model_fn(x_t, t):
    a, s = _alpha_sigma(schedule, t, x_t.ndim)
    marginal_var = a**2 * std**2 + s**2
    eps = s * (x_t - a * mean) / marginal_var
    if prediction == "eps":
      return eps
    x0 = mean + a * std**2 * (x_t - a * mean) / marginal_var
    return a * eps - s * x0

  return model_fn


def exact_flow_endpoint(schedule, x_T, mean=DATA_MEAN, std=DATA_STD):
  abar_T = schedule.alphas_cumprod[-1]
  marginal_std = jnp.sqrt(abar_T * std**2 + 1 - abar_T)
  return mean + std * (x_T - jnp.sqrt(abar_T) * mean) / marginal_std


# ---------------------------------------------------------------- schedules


def test_linear_schedule_values():
  schedule = diffusion.make_schedule("linear", 1000)
  betas = np.asarray(schedule.betas)
  alphas_cumprod = np.asarray(schedule.alphas_cumprod)
  assert schedule.num_timesteps == 1000
  assert betas.shape == alphas_cumprod.shape == (1000,)
  np.testing.assert_allclose(betas[0], 1e-4, rtol=1e-6)
  np.testing.assert_allclose(betas[-1], 0.02, rtol=1e-6)
  assert np.all(np.diff(betas) > 0)
  assert np.all(np.diff(alphas_cumprod) < 0)
  assert np.all((alphas_cumprod > 0) & (alphas_cumprod < 1))
  np.testing.assert_allclose(
      alphas_cumprod, np.cumprod(1 - betas.astype(np.float64)), rtol=1e-5)


def test_cosine_schedule_follows_nichol_dhariwal():
  num_timesteps, offset = 1000, 0.008
  schedule = diffusion.make_schedule("cosine", num_timesteps)
  betas = np.asarray(schedule.betas)
  alphas_cumprod = np.asarray(schedule.alphas_cumprod)
  assert np.all((betas > 0) & (betas <= 0.999))
  np.testing.assert_allclose(betas[-1], 0.999, rtol=1e-6)  # The clip bites.
  assert np.all(np.diff(alphas_cumprod) < 0)
  assert np.all((alphas_cumprod > 0) & (alphas_cumprod < 1))

  def f(t):
    return np.cos((t / num_timesteps + offset) / (1 + offset) * np.pi / 2)**2

  t = np.array([1, 250, 500, 750])  # Away from the clipped end.
  np.testing.assert_allclose(alphas_cumprod[t - 1], f(t) / f(0), rtol=1e-4)


def test_unknown_schedule_lists_choices():
  with pytest.raises(ValueError, match="cosine.*linear"):
    diffusion.make_schedule("sigmoid")


def test_schedule_is_a_pytree_through_jit():
  schedule = linear_schedule()
  abar_T = jax.jit(lambda s: s.alphas_cumprod[s.num_timesteps - 1])(schedule)
  assert float(abar_T) == float(schedule.alphas_cumprod[-1])


# ------------------------------------------------------------------ training


def test_sample_timesteps_covers_one_to_T():
  t = diffusion.sample_timesteps(jax.random.key(0), 5000, 10)
  assert t.dtype == jnp.int32 and t.shape == (5000,)
  assert set(np.unique(np.asarray(t)).tolist()) == set(range(1, 11))


def test_q_sample_statistics_per_example_and_spatial():
  schedule = linear_schedule()
  n = 20000
  # Half the batch at an early, half at a late step; spatial latents.
  t = jnp.asarray(np.repeat([10, 900], n).astype(np.int32))
  x0 = np.broadcast_to(np.array([0.7, -1.3, 2.0]).reshape(1, 3, 1, 1),
                       (2 * n, 3, 2, 2)).astype(np.float32)
  noise = np.random.default_rng(1).standard_normal(x0.shape, np.float32)
  x_t = np.asarray(diffusion.q_sample(schedule, x0, t, noise))
  for half, step in ((slice(0, n), 10), (slice(n, None), 900)):
    abar = float(schedule.alphas_cumprod[step - 1])
    np.testing.assert_allclose(x_t[half].mean(0), np.sqrt(abar) * x0[0],
                               atol=0.03)
    np.testing.assert_allclose(x_t[half].var(0), 1 - abar, rtol=0.05)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_targets_convert_back_to_x0_and_eps(prediction):
  schedule = linear_schedule()
  data_rng = np.random.default_rng(2)
  x0 = data_rng.standard_normal((64, 4, 4, 3), np.float32)
  noise = data_rng.standard_normal(x0.shape, np.float32)
  t = jnp.asarray(data_rng.integers(1, 1001, 64, dtype=np.int32))
  x_t = diffusion.q_sample(schedule, x0, t, noise)
  target = diffusion.training_target(schedule, x0, noise, t, prediction)
  a, s = _alpha_sigma(schedule, t, x0.ndim)
  expected = noise if prediction == "eps" else a * noise - s * x0
  np.testing.assert_allclose(target, expected, rtol=1e-6, atol=1e-6)
  x0_hat, eps_hat = diffusion.predict_x0_eps(schedule, target, x_t, t,
                                             prediction)
  np.testing.assert_allclose(x0_hat, x0, atol=1e-3)
  np.testing.assert_allclose(eps_hat, noise, atol=1e-4)


def test_unknown_prediction_errors():
  schedule = linear_schedule()
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="eps"):
    diffusion.predict_x0_eps(schedule, x, x, jnp.ones(2, jnp.int32), "x0")


def test_diffusion_loss_zero_for_a_model_that_knows_x0():
  # Data is a single point c, so the target is a function of (x_t, t): a model
  # computing it scores ~0 only if the loss feeds it the x_t and t it used.
  schedule = linear_schedule()
  c = jnp.linspace(-1, 1, 12).reshape(1, 2, 2, 3)
  x0 = jnp.broadcast_to(c, (32, 2, 2, 3))

  def oracle(prediction):
    def model_fn(x_t, t):
      a, s = _alpha_sigma(schedule, t, x_t.ndim)
      eps = (x_t - a * c) / s
      return eps if prediction == "eps" else a * eps - s * c
    return model_fn

  @jax.jit  # One compilation for all three losses.
  def losses(rng):
    return (
        diffusion.diffusion_loss(schedule, oracle("eps"), x0, rng, "eps"),
        diffusion.diffusion_loss(schedule, oracle("v"), x0, rng, "v"),
        diffusion.diffusion_loss(schedule, lambda x_t, t: jnp.zeros_like(x_t),
                                 x0, rng, "eps"),
    )

  eps_loss, v_loss, zeros_loss = losses(jax.random.key(3))
  assert eps_loss.shape == v_loss.shape == (32,)
  assert float(eps_loss.max()) < 1e-6 and float(v_loss.max()) < 1e-6
  # A model that predicts zeros pays E[eps^2] = 1 per dimension.
  np.testing.assert_allclose(float(zeros_loss.mean()), 1.0, atol=0.15)


# ------------------------------------------------------------------ guidance


def _labelled_model(calls):
  """A toy conditional model; null label 0 makes it unconditional."""

  def model_fn(x_t, t, labels):
    calls.append(x_t.shape[0])
    return x_t * (1.0 + labels[:, None]) + t[:, None] * 0.01

  return model_fn


def _guidance_case(seed):
  """Inputs, a call-counting model, and its conditional/unconditional outputs."""
  x = jax.random.normal(jax.random.key(seed), (6, 3))
  t = jnp.arange(1, 7, dtype=jnp.int32)
  labels = jnp.array([1, 2, 3, 4, 5, 6])
  calls = []
  model_fn = _labelled_model(calls)
  cond = model_fn(x, t, labels)
  uncond = model_fn(x, t, jnp.zeros_like(labels))
  calls.clear()
  return x, t, labels, calls, model_fn, cond, uncond


def test_guidance_special_weights_are_single_plain_calls():
  x, t, labels, calls, model_fn, cond, uncond = _guidance_case(4)
  np.testing.assert_array_equal(
      diffusion.guided_model_fn(model_fn, labels, 0, 1.0)(x, t), cond)
  np.testing.assert_array_equal(
      diffusion.guided_model_fn(model_fn, labels, 0, 0.0)(x, t), uncond)
  assert calls == [6, 6]


def test_guidance_formula_in_one_batched_call():
  x, t, labels, calls, model_fn, cond, uncond = _guidance_case(5)
  guided = diffusion.guided_model_fn(model_fn, labels, 0, 2.0)(x, t)
  np.testing.assert_allclose(guided, uncond + 2.0 * (cond - uncond),
                             rtol=1e-6)
  assert calls == [12]
  # A traced weight takes the same path and gives the same answer.
  traced = jax.jit(lambda w: diffusion.guided_model_fn(
      model_fn, labels, 0, w)(x, t))(2.0)
  np.testing.assert_allclose(traced, guided, rtol=1e-6)


def test_autoguidance_adds_the_guide_term():
  x, t, labels, calls, model_fn, cond, uncond = _guidance_case(6)
  guide_calls = []
  # A guide that differs from the model (another scale of x), so the guide
  # term is not zero.
  guide_fn = lambda x_t, t, l: 0.5 * _labelled_model(guide_calls)(x_t, t, l)
  guide = guide_fn(x, t, labels)
  guide_calls.clear()
  out = diffusion.guided_model_fn(model_fn, labels, 0, 3.0, guide_fn=guide_fn,
                                  autoguidance=2.5)(x, t)
  np.testing.assert_allclose(
      out, uncond + 3.0 * (cond - uncond) + 1.5 * (cond - guide), rtol=1e-5)
  assert calls == [12] and guide_calls == [6]
  # Without classifier-free guidance: the conditional model once, the guide once.
  calls.clear()
  out = diffusion.guided_model_fn(model_fn, labels, 0, 1.0, guide_fn=guide_fn,
                                  autoguidance=2.0)(x, t)
  np.testing.assert_allclose(out, 2.0 * cond - guide, rtol=1e-5)
  assert calls == [6]


def test_autoguidance_off_never_calls_the_guide():
  x, t, labels, calls, model_fn, cond, uncond = _guidance_case(7)
  def guide_fn(*args):
    raise AssertionError("the guide was called")
  out = diffusion.guided_model_fn(model_fn, labels, 0, 2.0, guide_fn=guide_fn,
                                  autoguidance=1.0)(x, t)
  np.testing.assert_allclose(out, uncond + 2.0 * (cond - uncond), rtol=1e-6)
  with pytest.raises(ValueError, match="needs a guide_fn"):
    diffusion.guided_model_fn(model_fn, labels, 0, 2.0, autoguidance=2.0)


# ------------------------------------------------------------------ samplers


@functools.partial(jax.jit, static_argnums=(0, 1),
                   static_argnames=("num_steps", "eta", "prediction"))
def _jitted_sample(sampler, model_fn, schedule, x_T, rng, **kwargs):
  return diffusion.sample(sampler, model_fn, schedule, x_T, rng, **kwargs)


def _sample(sampler, model_fn, schedule, x_T, rng, **kwargs):
  return np.asarray(_jitted_sample(sampler, model_fn, schedule, x_T, rng,
                                   **kwargs))


@pytest.mark.parametrize("sampler,num_steps,eta,prediction", [
    ("ddpm", None, 0.0, "eps"),
    ("ddim", 50, 0.0, "eps"),
    ("ddim", 250, 1.0, "v"),
    ("dpm_solver", 20, 0.0, "eps"),
    ("dpm_solver", 20, 0.0, "v"),
])
def test_sampler_reproduces_gaussian_data(sampler, num_steps, eta,
                                          prediction):
  schedule = linear_schedule()
  x_T = jax.random.normal(jax.random.key(6), (4000, 2))
  samples = _sample(sampler, gaussian_model(1000, prediction), schedule,
                    x_T, jax.random.key(7), num_steps=num_steps, eta=eta,
                    prediction=prediction)
  # Standard errors are 1.6% of the std for the mean and ~1% for the std;
  # the tolerances leave room for the samplers' discretisation error (~5% for
  # DDIM-50, and stochastic DDIM ignores the uncertainty in x0_hat, which
  # shrinks the std by ~3% at 250 steps) but not for a wrong coefficient.
  np.testing.assert_array_less(np.abs(samples.mean(0) - DATA_MEAN),
                               0.1 * DATA_STD)
  np.testing.assert_allclose(samples.std(0), DATA_STD, rtol=0.08)


def test_ddim_all_steps_eta_one_is_ddpm():
  schedule = linear_schedule()
  model_fn = gaussian_model()
  x_T = jax.random.normal(jax.random.key(6), (4000, 2))
  ddpm = _sample("ddpm", model_fn, schedule, x_T, jax.random.key(9))
  ddim = _sample("ddim", model_fn, schedule, x_T, jax.random.key(10),
                 num_steps=1000, eta=1.0)
  # In distribution, with independent noise ...
  np.testing.assert_allclose(ddim.mean(0), ddpm.mean(0), atol=0.08)
  np.testing.assert_allclose(ddim.var(0), ddpm.var(0), rtol=0.1)
  # ... and path by path, since both key their noise by step index.
  same_noise = _sample("ddim", model_fn, schedule, x_T, jax.random.key(9),
                       num_steps=1000, eta=1.0)
  np.testing.assert_allclose(same_noise, ddpm, atol=1e-3)


def test_deterministic_samplers_converge_to_the_flow_map():
  schedule = linear_schedule()
  model_fn = gaussian_model()
  x_T = jnp.stack([jnp.linspace(-3, 3, 9)] * 2, axis=1)
  exact = np.asarray(exact_flow_endpoint(schedule, x_T))

  def error(sampler, num_steps):
    out = _sample(sampler, model_fn, schedule, x_T, jax.random.key(0),
                  num_steps=num_steps)
    return np.abs(out - exact).max()

  ddim_20, ddim_80 = error("ddim", 20), error("ddim", 80)
  dpm_20, dpm_80 = error("dpm_solver", 20), error("dpm_solver", 80)
  # DDIM is first order: 4x the steps, ~4x less error.
  assert 3.0 < ddim_20 / ddim_80 < 5.0
  # DPM-Solver++(2M) beats it at equal cost, and improves faster.
  assert dpm_20 < ddim_20 / 2 and dpm_80 < ddim_80 / 5
  assert dpm_80 < dpm_20 / 5


def test_sample_is_deterministic_for_a_given_rng():
  schedule = linear_schedule(100)
  model_fn = gaussian_model(100)
  x_T = jax.random.normal(jax.random.key(11), (8, 2))
  first = _sample("ddim", model_fn, schedule, x_T, jax.random.key(1),
                  num_steps=10, eta=0.5)
  again = _sample("ddim", model_fn, schedule, x_T, jax.random.key(1),
                  num_steps=10, eta=0.5)
  other = _sample("ddim", model_fn, schedule, x_T, jax.random.key(2),
                  num_steps=10, eta=0.5)
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, other)


def test_one_step_samplers_return_the_x0_prediction_at_T():
  schedule = linear_schedule(100)
  model_fn = gaussian_model(100)
  x_T = jax.random.normal(jax.random.key(14), (8, 2))
  t = jnp.full((8,), 100, jnp.int32)
  x0_hat, _ = diffusion.predict_x0_eps(schedule, model_fn(x_T, t), x_T, t,
                                       "eps")
  for sampler in ("ddim", "dpm_solver"):
    out = _sample(sampler, model_fn, schedule, x_T, jax.random.key(0),
                  num_steps=1)
    np.testing.assert_allclose(out, x0_hat, rtol=1e-5, err_msg=sampler)
  clipped = _sample("ddim", model_fn, schedule, x_T, jax.random.key(0),
                    num_steps=1, clip_x0=0.1)
  np.testing.assert_allclose(clipped, np.clip(x0_hat, -0.1, 0.1), rtol=1e-5)
  low_precision = _jitted_sample("dpm_solver", model_fn, schedule,
                                 x_T.astype(jnp.bfloat16), jax.random.key(0),
                                 num_steps=3)
  assert low_precision.dtype == jnp.bfloat16


def test_timestep_sequence_spacing():
  np.testing.assert_array_equal(diffusion.timestep_sequence(1000, 5),
                                [1000, 750, 500, 251, 1])
  every = diffusion.timestep_sequence(1000, 1000)
  np.testing.assert_array_equal(every, np.arange(1000, 0, -1))
  with pytest.raises(ValueError):
    diffusion.timestep_sequence(10, 11)


def test_sample_argument_errors():
  schedule = linear_schedule(10)
  model_fn = gaussian_model_fn(schedule)
  x_T, rng = jnp.zeros((2, 2)), jax.random.key(0)
  with pytest.raises(ValueError, match="ddim.*ddpm.*dpm_solver"):
    diffusion.sample("euler", model_fn, schedule, x_T, rng)
  with pytest.raises(ValueError, match="num_steps"):
    diffusion.sample("ddim", model_fn, schedule, x_T, rng, num_steps=11)
  with pytest.raises(ValueError, match="eta"):
    diffusion.sample("dpm_solver", model_fn, schedule, x_T, rng, eta=1.0)
  with pytest.raises(ValueError, match="prediction"):
    diffusion.sample("ddim", model_fn, schedule, x_T, rng, prediction="x0")


def test_sharded_sampling_matches_one_device():
  mesh = parallel.make_mesh()
  assert mesh.devices.size == 8
  schedule = linear_schedule(100)
  # Label 0 is the null label, answered by a mean-zero "unconditional" model.
  class_means = jnp.array([[0.0, 0.0], [1.0, -1.0], [-2.0, 0.5], [3.0, 2.0]])

  def model_fn(x_t, t, labels):
    per_class = jnp.stack([gaussian_model_fn(schedule, mean=m)(x_t, t)
                           for m in class_means])
    return jnp.take_along_axis(per_class, labels[None, :, None], axis=0)[0]

  @jax.jit  # Every sampler in one program, so this compiles twice, not 6x.
  def run_all(x_T, labels, rng):
    guided = diffusion.guided_model_fn(model_fn, labels, 0, 2.0)
    return {
        "ddpm": diffusion.sample("ddpm", guided, schedule, x_T, rng),
        "ddim": diffusion.sample("ddim", guided, schedule, x_T, rng,
                                 num_steps=10, eta=0.5),
        "dpm_solver": diffusion.sample("dpm_solver", guided, schedule, x_T,
                                       rng, num_steps=10),
    }

  x_T = np.random.default_rng(12).standard_normal((32, 2), np.float32)
  labels = np.arange(32, dtype=np.int32) % len(class_means)
  rng = jax.random.key(13)
  one_device = jax.devices()[0]
  single = run_all(jax.device_put(x_T, one_device),
                   jax.device_put(labels, one_device), rng)
  sharded = run_all(*parallel.shard_batch(mesh, (x_T, labels)), rng)
  for name, out in sharded.items():
    assert out.sharding.is_equivalent_to(parallel.batch_sharding(mesh), 2)
    np.testing.assert_allclose(parallel.gather_to_host(out),
                               np.asarray(single[name]), rtol=1e-5,
                               atol=1e-5, err_msg=name)


# ----------------------------------------------------------------------- EMA


def test_ema_update_math_and_dtypes():
  ema = {"w": jnp.full((3,), 2.0), "b": jnp.zeros((), jnp.bfloat16),
         "count": jnp.array(7)}
  params = {"w": jnp.arange(3.0), "b": jnp.ones((), jnp.bfloat16),
            "count": jnp.array(8)}
  new = ema_update(ema, params, 0.9)
  np.testing.assert_allclose(new["w"], 0.9 * 2.0 + 0.1 * np.arange(3.0),
                             rtol=1e-6)
  assert new["b"].dtype == jnp.bfloat16
  np.testing.assert_allclose(float(new["b"]), 0.1, rtol=1e-2)
  assert int(new["count"]) == 8  # Integers are copied, not averaged.
  np.testing.assert_array_equal(ema_update(ema, params, 1.0)["w"], ema["w"])
  np.testing.assert_array_equal(ema_update(ema, params, 0.0)["w"],
                                params["w"])


def test_ema_converges_geometrically_under_jit():
  ema, target, decay = jnp.zeros(4), jnp.ones(4), 0.99
  step = jax.jit(ema_update)
  for _ in range(100):
    ema = step(ema, target, jnp.float32(decay))
  # e_n = target + decay^n (e_0 - target).
  np.testing.assert_allclose(ema, 1.0 - decay**100, rtol=1e-4)


def test_ema_on_nnx_state():
  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  zeros = jax.tree.map(jnp.zeros_like, params)
  new = ema_update(zeros, params, 0.75)
  assert isinstance(new, type(params))
  np.testing.assert_allclose(new["kernel"].get_value(),
                             0.25 * params["kernel"].get_value(), rtol=1e-6)
