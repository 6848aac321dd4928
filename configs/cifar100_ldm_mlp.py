"""Stage 2 recipe with the original's simplified denoiser: a residual MLP on the
flat 128-d latent of configs/cifar100_vae_vector.py.

  python train.py --config=configs/cifar100_ldm_mlp.py --workdir=runs/ldm_mlp \
      --config.vae_checkpoint=runs/vae_vector
"""

from configs import cifar100_ldm


def get_config():
  config = cifar100_ldm.get_config()
  config.ldm.denoiser = "mlp"
  config.ldm.latent = "vector"
  del config.unet
  config.mlp = dict(hidden_dim=1024, num_blocks=4, emb_dim=256, dropout=0.0)
  return config
