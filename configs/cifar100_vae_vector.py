"""Stage 1 recipe with the original project's flat 128-d latent.

  python train.py --config=configs/cifar100_vae_vector.py --workdir=runs/vae_vector

Pairs with configs/cifar100_ldm_mlp.py (the MLP denoiser works on vectors).
"""

from configs import cifar100_vae


def get_config():
  config = cifar100_vae.get_config()
  config.vae.model.latent = "vector"
  config.vae.model.channel_multipliers = (1, 2, 2)
  config.vae.model.latent_dim = 128
  return config
