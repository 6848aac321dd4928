"""The main job for one GPU: the VAE and the LDM recipes, then samples and FID.

  python train.py --config=configs/cifar100.py --workdir=runs/main \
      --config.fid.reference=cifar100_train_stats.npz

Composed of configs/cifar100_vae.py and configs/cifar100_ldm.py at their full
lengths; see ldm_jax/pipeline.py for what it writes. Any stage value can be
overridden, e.g. --config.ldm_stage.train.batch_size=256. Not yet run to the
end: the recipes are sized for a GPU and none has been lent for that long.
"""

from configs import cifar100_ldm, cifar100_vae
from ldm_jax import pipeline


def get_config():
  config = pipeline.base_pipeline_config(cifar100_vae.get_config(), cifar100_ldm.get_config())
  config.sample.num_samples = 10_000
  config.fid.sample_counts = (512, 2_000, 10_000)
  return config
