"""A VAE small enough for tests and smoke runs on a laptop CPU (seconds a step).

  python train.py --config=configs/tiny_vae.py --workdir=/tmp/tiny_vae
"""

from configs import cifar100_vae
from ldm_jax import config as config_lib


def get_config():
  config = config_lib.shrink_for_smoke_runs(cifar100_vae.get_config())
  config.vae.model.channels = 8
  config.vae.model.num_res_blocks = 1
  config.eval.picture_examples = 4
  return config
