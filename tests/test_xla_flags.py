"""The XLA:CPU flag that ldm_jax sets on import (see ldm_jax/__init__.py)."""

import os
from importlib import metadata

import pytest

import ldm_jax

FLAG = "--xla_cpu_experimental_ynn_fusion_type"


@pytest.fixture
def jaxlib_version(monkeypatch):
  def set_version(version):
    monkeypatch.setattr(metadata, "version", lambda name: version)
  return set_version


def test_the_flag_is_added_to_other_flags(monkeypatch, jaxlib_version):
  jaxlib_version("0.10.2")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  ldm_jax._default_xla_cpu_flags()
  assert os.environ["XLA_FLAGS"].split() == [
      "--xla_force_host_platform_device_count=8", FLAG + "=reduce"]
  ldm_jax._default_xla_cpu_flags()  # Idempotent.
  assert os.environ["XLA_FLAGS"].count(FLAG) == 1


def test_a_users_setting_is_kept(monkeypatch, jaxlib_version):
  jaxlib_version("0.10.2")
  monkeypatch.setenv("XLA_FLAGS", FLAG + "=dot")
  ldm_jax._default_xla_cpu_flags()
  assert os.environ["XLA_FLAGS"] == FLAG + "=dot"


@pytest.mark.parametrize("version", ["0.11.0", "0.9.9"])
def test_other_jaxlib_versions_get_nothing(monkeypatch, jaxlib_version, version):
  # The flag is experimental: another jaxlib may not know it and would abort.
  jaxlib_version(version)
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  ldm_jax._default_xla_cpu_flags()
  assert "XLA_FLAGS" not in os.environ


def test_this_process_runs_with_the_flag():
  # conftest set the fake device count before ldm_jax was imported.
  assert FLAG + "=reduce" in os.environ["XLA_FLAGS"].split()
  assert "--xla_force_host_platform_device_count=8" in os.environ["XLA_FLAGS"]
