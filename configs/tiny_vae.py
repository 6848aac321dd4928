"""A VAE small enough for tests and smoke runs on a laptop CPU (seconds a step).

  python train.py --config=configs/tiny_vae.py --workdir=/tmp/tiny_vae
"""

from configs import cifar100_vae


def get_config():
  config = cifar100_vae.get_config()
  config.vae.model.channels = 8
  config.vae.model.num_res_blocks = 1
  config.train.batch_size = 16
  config.train.num_steps = 20
  config.train.log_every = 5
  config.train.eval_every = 10
  config.train.checkpoint_every = 10
  config.train.progress_bar = False
  config.optim.learning_rate = 3e-3
  config.optim.warmup_steps = 2
  config.eval.batch_size = 16
  config.eval.num_examples = 32
  config.eval.picture_examples = 4
  return config
