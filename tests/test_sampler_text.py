"""The short text form of sampler settings (sampling.parse_setting), as the
sampler sweep (bench/sweep_samplers.py) takes them."""

import pytest

from ldm_jax import sampling


def test_plain_setting_is_deterministic_and_unguided_by_a_guide():
  setting = sampling.parse_setting("dpm_solver-10@5")
  assert (setting.sampler, setting.num_steps, setting.guidance) == ("dpm_solver", 10, 5.0)
  assert setting.eta == 0.0 and setting.clip_x0 is None
  assert setting.autoguidance == 1.0 and setting.guide_step is None


def test_suffixes_are_read_in_the_documented_order():
  setting = sampling.parse_setting("ddim-50@5/clip3/auto2@700/eta1")
  assert (setting.sampler, setting.num_steps, setting.guidance) == ("ddim", 50, 5.0)
  assert (setting.clip_x0, setting.autoguidance, setting.guide_step, setting.eta) == (
      3.0, 2.0, 700, 1.0)
  setting = sampling.parse_setting("ddim-25@2/eta0.5")
  assert setting.eta == 0.5 and setting.clip_x0 is None and setting.guide_step is None


def test_eta_outside_ddim_is_refused():
  with pytest.raises(ValueError, match="eta"):
    sampling.parse_setting("dpm_solver-10@5/eta1")


@pytest.mark.parametrize("text", ["ddim-50@5/eta1/clip3", "dpm_solver-10@5/auto2@700/clip3",
                                  "dpm_solver-10", "dpm_solver-10@5@7"])
def test_malformed_or_reordered_text_names_the_grammar(text):
  with pytest.raises(ValueError, match="in that order"):
    sampling.parse_setting(text)
