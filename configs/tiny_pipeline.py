"""The main job shrunk for tests and smoke runs: the tiny VAE and LDM, a few
samples, and FID over them (seconds on a CPU, with any Inception weights).

  python train.py --config=configs/tiny_pipeline.py --workdir=/tmp/tiny_main \
      --config.data.data_dir=D
"""

from configs import tiny_ldm, tiny_vae
from ldm_jax import pipeline


def get_config():
  config = pipeline.base_pipeline_config(tiny_vae.get_config(), tiny_ldm.get_config())
  # Autoguidance as configs/cifar100_cpu.py samples, by step 5 of the 20.
  config.sample.update(num_samples=16, steps=3, batch_size=16, clip_x0=4.0, autoguidance=2.0,
                       guide_step=5)
  config.fid.update(sample_counts=(8, 16), vae_reconstructions=16, batch_size=16)
  return config
