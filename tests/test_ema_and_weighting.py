"""EMA decay schedules and the diffusion loss options (weightings, timesteps)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import diffusion, ema


def run_average(schedule, trajectory):
  """The EMA of a scalar parameter that takes the values of `trajectory`,
  starting from trajectory[0] as the initial weights do."""
  average = jnp.float32(trajectory[0])
  for step, value in enumerate(trajectory[1:]):
    average = ema.ema_update(average, jnp.float32(value), schedule(jnp.int32(step)))
  return float(average)


def test_constant_decay_keeps_the_initial_weights_of_a_short_run():
  # The failure the warm-up exists for: 250 steps of 0.9999 keep 97.5 % of init.
  trajectory = np.linspace(0.0, 1.0, 251)
  average = run_average(ema.decay_schedule("constant", batch_size=64, decay=0.9999), trajectory)
  assert average < 0.05


@pytest.mark.parametrize("kind", ["halflife", "power"])
def test_warmup_schedules_follow_the_trained_weights_in_a_short_run(kind):
  # Parameters drift from 0 (init) to 1 (trained) over 250 steps.
  trajectory = np.linspace(0.0, 1.0, 251)
  schedule = ema.decay_schedule(kind, batch_size=64, halflife_images=500_000,
                                rampup_ratio=0.05, power_std=0.05)
  assert run_average(schedule, trajectory) > 0.9


def test_halflife_schedule_settles_to_the_configured_halflife():
  schedule = ema.decay_schedule("halflife", batch_size=128, halflife_images=500_000,
                                rampup_ratio=0.05)
  # Ramp-up: after n images the half-life is 5 % of them.
  np.testing.assert_allclose(float(schedule(jnp.int32(99))), 0.5 ** (128 / (0.05 * 12_800)),
                             rtol=1e-6)
  # Long run: 0.05 * images seen exceeds the cap, and the half-life is the configured one.
  late = float(schedule(jnp.int32(1_000_000)))
  np.testing.assert_allclose(late, 0.5 ** (128 / 500_000), rtol=1e-6)
  # A weight seen one half-life of images ago counts half: decay^(steps) = 0.5.
  np.testing.assert_allclose(late ** (500_000 / 128), 0.5, rtol=1e-4)
  no_rampup = ema.decay_schedule("halflife", batch_size=128, halflife_images=500_000,
                                 rampup_ratio=None)
  np.testing.assert_allclose(float(no_rampup(jnp.int32(0))), late, rtol=1e-6)


def test_power_schedule_is_edm2s_average():
  gamma = ema.power_gamma_from_std(0.05)
  std = np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))
  np.testing.assert_allclose(std, 0.05, rtol=1e-9)
  np.testing.assert_allclose(ema.power_gamma_from_std(0.10), 6.94, atol=0.01)  # EDM2 table.
  schedule = ema.decay_schedule("power", batch_size=1, power_std=0.05)
  assert float(schedule(jnp.int32(0))) == 0.0  # The first update copies the weights.
  # Over a run of any length the average weighs step k by k^gamma: for a linear
  # drift 0..N its value is N (gamma + 1) / (gamma + 2), whatever N is.
  for n in (50, 400):
    trajectory = np.arange(n + 1, dtype=np.float64)
    np.testing.assert_allclose(run_average(schedule, trajectory) / n,
                               (gamma + 1) / (gamma + 2), rtol=0.02)


def test_bad_ema_settings_are_refused():
  with pytest.raises(ValueError, match="unknown EMA schedule"):
    ema.decay_schedule("cosine", batch_size=1)
  with pytest.raises(ValueError, match="std must be in"):
    ema.decay_schedule("power", batch_size=1, power_std=0.5)
  with pytest.raises(ValueError, match="positive"):
    ema.decay_schedule("halflife", batch_size=1, halflife_images=0)


SCHEDULE = diffusion.make_schedule("linear", 1000, 1e-4, 0.02)


def test_min_snr_weights_at_known_snrs():
  snr = jnp.array([0.25, 1.0, 5.0, 20.0, 400.0])
  # x0 weight min(SNR, 5), divided by SNR (eps target) or SNR + 1 (v target).
  np.testing.assert_allclose(diffusion.loss_weight(snr, "eps", "min_snr", 5.0),
                             [1.0, 1.0, 1.0, 0.25, 5 / 400], rtol=1e-6)
  np.testing.assert_allclose(diffusion.loss_weight(snr, "v", "min_snr", 5.0),
                             [0.2, 0.5, 5 / 6, 5 / 21, 5 / 401], rtol=1e-6)
  np.testing.assert_array_equal(diffusion.loss_weight(snr, "v", "none"), np.ones(5))
  with pytest.raises(ValueError, match="unknown loss weighting"):
    diffusion.loss_weight(snr, "eps", "p2")


def test_signal_to_noise_matches_the_schedule():
  t = jnp.array([1, 500, 1000])
  abar = np.asarray(SCHEDULE.alphas_cumprod)[[0, 499, 999]]
  np.testing.assert_allclose(diffusion.signal_to_noise(SCHEDULE, t), abar / (1 - abar), rtol=1e-5)


def test_min_snr_loss_equals_the_x0_error_clamped():
  # For an eps network that outputs 0, the eps error is |eps|^2 per dim; Min-SNR
  # turns the loss into min(SNR, gamma) x (x0 error), with the x0 error |eps|^2 / SNR.
  x0 = jax.random.normal(jax.random.key(1), (256, 4))
  rng = jax.random.key(2)
  zero = lambda x_t, t: jnp.zeros_like(x_t)
  plain = diffusion.diffusion_loss(SCHEDULE, zero, x0, rng, "eps")
  weighted = diffusion.diffusion_loss(SCHEDULE, zero, x0, rng, "eps", weighting="min_snr")
  t = diffusion.sample_timesteps(jax.random.split(rng)[0], 256, 1000)  # The same draws.
  snr = diffusion.signal_to_noise(SCHEDULE, t)
  np.testing.assert_allclose(weighted, plain * np.minimum(snr, 5.0) / snr, rtol=1e-5)


def test_lognormal_timesteps_follow_edms_noise_distribution():
  t = diffusion.sample_timesteps_lognormal(jax.random.key(0), 20_000, SCHEDULE, -1.2, 1.2)
  assert t.dtype == jnp.int32 and int(t.min()) >= 1 and int(t.max()) <= 1000
  abar = np.asarray(SCHEDULE.alphas_cumprod)[np.asarray(t) - 1]
  log_sigma = 0.5 * np.log((1 - abar) / abar)
  # The schedule's range is log sigma in [-4.6, 4.4]: N(-1.2, 1.2) lies inside it.
  assert abs(np.median(log_sigma) - (-1.2)) < 0.05
  assert abs(np.std(log_sigma) - 1.2) < 0.05
  uniform = diffusion.sample_timesteps(jax.random.key(0), 20_000, 1000)
  assert np.median(np.asarray(t)) < np.median(np.asarray(uniform))  # Less time at pure noise.


def test_lognormal_maps_to_the_nearest_step():
  abar = np.asarray(SCHEDULE.alphas_cumprod, np.float64)
  schedule_log_sigma = 0.5 * np.log((1 - abar) / abar)
  for step in (1, 37, 500, 999, 1000):
    # A draw of std 0 lands exactly on this step's noise level.
    t = diffusion.sample_timesteps_lognormal(jax.random.key(0), 4, SCHEDULE,
                                             float(schedule_log_sigma[step - 1]), 0.0)
    np.testing.assert_array_equal(t, step)


def test_unknown_timestep_sampling_is_refused():
  with pytest.raises(ValueError, match="unknown timestep sampling"):
    diffusion.diffusion_loss(SCHEDULE, lambda x, t: x, jnp.zeros((2, 3)), jax.random.key(0),
                             timestep_sampling="beta")
