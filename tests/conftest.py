"""Test-wide setup: 8 fake CPU devices, so the data-parallel code really splits.

XLA reads the flag once, when jax first initialises its backend, so it is set
here, before any test module imports jax.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests rebuild the same tiny programs many times (each run jits its own step):
# a compilation cache shared by the session turns those recompiles into loads.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/ldm_jax_test_jax_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# XLA's CPU optimisation passes dominate the suite's time on tiny models and
# change no result a test checks (equalities are within one program setting).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import numpy as np
import pytest

from ldm_jax import train_loop

TINY_TRAIN, TINY_TEST = 400, 80


def write_fake_cifar_npz(directory, num_train=TINY_TRAIN, num_test=TINY_TEST, seed=0):
  """A tiny CIFAR-100 look-alike in the numpy-shard source format.

  Images are smooth colour gradients whose colours depend on the class, so a
  model has something learnable; labels run 0..99 like the real files.
  """
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True, exist_ok=True)

  def images_and_labels(count):
    labels = (np.arange(count) % 100).astype(np.uint8)
    ramp = np.linspace(0.0, 1.0, 32, dtype=np.float32)
    base = rng.uniform(0, 255, size=(100, 1, 1, 3)).astype(np.float32)[labels]
    slope = rng.uniform(-80, 80, size=(count, 1, 1, 3)).astype(np.float32)
    images = base + slope * (ramp[None, :, None, None] + ramp[None, None, :, None]) / 2
    images += rng.normal(0, 8, size=images.shape)
    return np.clip(images, 0, 255).astype(np.uint8), labels

  train_images, train_labels = images_and_labels(num_train)
  shard = num_train // 4
  for k in range(4):
    rows = slice(k * shard, (k + 1) * shard)
    np.savez(directory / f"cifar100_train_{k}of4.npz",
             train_images=train_images[rows], train_fine_labels=train_labels[rows],
             train_coarse_labels=train_labels[rows] // 5)
  test_images, test_labels = images_and_labels(num_test)
  np.savez(directory / "cifar100_test.npz", test_images=test_images,
           test_fine_labels=test_labels, test_coarse_labels=test_labels // 5)
  (directory / "labels.txt").write_text("".join(f"class_{i:02d}\n" for i in range(100)))
  (directory / "coarse_labels.txt").write_text(
      "".join(f"super_{i:02d}\n" for i in range(20)))
  return directory


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
  """A prepared TFDS data dir holding the tiny fake CIFAR-100."""
  from ldm_jax import data
  root = tmp_path_factory.mktemp("tiny_cifar")
  source = write_fake_cifar_npz(root / "npz")
  data_dir = root / "tfds"
  data.prepare(str(data_dir), str(source),
               expected_sizes={"train": TINY_TRAIN, "test": TINY_TEST})
  return str(data_dir)


def vae_config(data_dir, **train):
  """configs/tiny_vae.py on the tiny data: 10 steps, checkpoints at 5 and 10."""
  from configs import tiny_vae
  config = tiny_vae.get_config()
  config.data.data_dir = data_dir
  config.train.num_steps = 10
  config.train.log_every = 5
  config.train.eval_every = 10
  config.train.checkpoint_every = 5
  for key, value in train.items():
    config.train[key] = value
  return config


@pytest.fixture(scope="session")
def vae_workdir(tiny_data_dir, tmp_path_factory):
  """A finished 10-step tiny VAE run, shared by the tests that only read it."""
  from ldm_jax import train_loop
  workdir = str(tmp_path_factory.mktemp("vae_run"))
  train_loop.train_and_evaluate(vae_config(tiny_data_dir), workdir)
  return workdir


@pytest.fixture(scope="session")
def random_fid_weights(tmp_path_factory):
  """FID Inception weights of the right shapes, random (He-scaled): for tests
  of the plumbing around the network, not of the network itself."""
  from ldm_jax.fid import weights as weights_lib
  rng = np.random.default_rng(0)
  params = {}
  for name, shape in weights_lib.expected_param_shapes().items():
    if name.endswith("kernel"):
      fan_in = shape[0] * shape[1] * shape[2]
      params[name] = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
    elif name.endswith("var"):
      params[name] = rng.uniform(0.5, 1.5, shape)
    else:
      params[name] = 0.1 * rng.normal(size=shape)
  params = {k: v.astype(np.float32) for k, v in params.items()}
  path = str(tmp_path_factory.mktemp("weights") / "random.npz")
  weights_lib.save_weights(params, {"source": "random"}, path)
  return path


def ldm_config(data_dir, vae_workdir, num_steps=6):
  """configs/tiny_ldm.py on the tiny data and VAE: 6 steps, logs at 3 and 6."""
  from configs import tiny_ldm
  config = tiny_ldm.get_config()
  config.data.data_dir = data_dir
  config.vae_checkpoint = vae_workdir
  config.train.num_steps = num_steps
  config.train.log_every = 3
  config.train.eval_every = num_steps
  config.train.checkpoint_every = num_steps
  return config


@pytest.fixture(scope="session")
def ldm_workdir(tiny_data_dir, vae_workdir, tmp_path_factory):
  """A finished 6-step tiny LDM run on 8 devices, shared by the tests that read it;
  step 3 is kept too (a guide for autoguidance)."""
  from ldm_jax import train_loop
  workdir = str(tmp_path_factory.mktemp("ldm_run"))
  config = ldm_config(tiny_data_dir, vae_workdir)
  config.train.keep_steps = (3,)
  train_loop.train_and_evaluate(config, workdir)
  return workdir


class PreemptedAfter(train_loop._Preemption):
  """Reports a SIGTERM once `steps` training steps have run."""
  steps = 0

  def __enter__(self):
    super().__enter__()
    self._polls = 0
    return self

  @property
  def requested(self):
    self._polls += 1
    return self._polls >= self.steps

  @requested.setter
  def requested(self, value):
    pass
