"""A latent diffusion run small enough for tests and smoke runs on a CPU.

  python train.py --config=configs/tiny_ldm.py --workdir=/tmp/tiny_ldm \
      --config.vae_checkpoint=/tmp/tiny_vae
"""

from configs import cifar100_ldm


def get_config():
  config = cifar100_ldm.get_config()
  config.unet.channels = 8
  config.unet.channel_multipliers = (1, 2)
  config.unet.num_res_blocks = 1
  config.unet.attention_levels = (1,)
  config.unet.num_heads = 2
  config.unet.context_dim = 16
  config.unet.dropout = 0.0
  config.diffusion.num_timesteps = 100
  config.ldm.ema_decay = 0.9
  config.ldm.scale_batches = 2
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
  config.eval.picture_examples = 2
  config.eval.picture_classes = 2
  config.eval.sample_steps = 3
  return config
