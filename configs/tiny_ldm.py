"""A latent diffusion run small enough for tests and smoke runs on a CPU.

  python train.py --config=configs/tiny_ldm.py --workdir=/tmp/tiny_ldm \
      --config.vae_checkpoint=/tmp/tiny_vae
"""

from configs import cifar100_ldm
from ldm_jax import config as config_lib


def get_config():
  config = config_lib.shrink_for_smoke_runs(cifar100_ldm.get_config())
  config.unet.update(channels=8, channel_multipliers=(1, 2), num_res_blocks=1,
                     attention_levels=(1,), num_heads=2, context_dim=16,
                     dropout=0.1)  # Non-zero: the dropout RNG path is exercised.
  config.diffusion.num_timesteps = 100
  config.ldm.ema.schedule = "constant"
  config.ldm.ema.decay = 0.9
  config.ldm.scale_batches = 2
  config.eval.picture_examples = 2
  config.eval.picture_classes = 2
  config.eval.sample_steps = 3
  return config
