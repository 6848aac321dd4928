"""Stage 2 recipe: class-conditional latent diffusion with the UNet denoiser.

  python train.py --config=configs/cifar100_ldm.py --workdir=runs/ldm \
      --config.vae_checkpoint=runs/vae

The VAE is restored from its workdir, frozen, and encodes each augmented batch
on the device. Diffusion follows the original project: 1000 steps, linear betas
from 1e-4 to 0.02, epsilon prediction; classes are dropped to a learned null
class 10% of the time so that sampling can use classifier-free guidance.

Measured (2 CPU cores, 8 fake devices; not yet run on a GPU): this recipe's
train step takes 27.5 s at batch 128 (4.7 images/s). A narrow variant
(--config.unet.channels=32 --config.unet.channel_multipliers='(1,2)'
--config.unet.num_res_blocks=1 --config.unet.attention_levels='(1,)'
--config.unet.context_dim=64 --config.train.batch_size=64) on the narrow VAE
of configs/cifar100_vae.py ran 250 steps in 6 minutes (1 step/s); its loss fell
from 0.89 to 0.19, and its DDIM-50 samples at w=2 are still colour textures,
not objects: a smoke run, not a result.
"""

import ml_collections

from ldm_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.stage = "ldm"
  config.vae_checkpoint = ml_collections.config_dict.placeholder(str)  # A VAE workdir.
  config.vae_step = ml_collections.config_dict.placeholder(int)  # None = its latest.

  config.diffusion = dict(
      schedule="linear",
      num_timesteps=1000,
      beta_start=1e-4,
      beta_end=0.02,
      prediction="eps",  # "eps" or "v": what the denoiser outputs.
      # Per-timestep loss weight: "none" is the plain DDPM loss of the original;
      # "min_snr" is Min-SNR-gamma (Hang et al. 2023).
      loss_weighting="none",
      min_snr_gamma=5.0,
      # Training timesteps: "uniform" over 1..T, or "lognormal": log sigma ~
      # N(mean, std) as in EDM, mapped to the nearest step of the schedule.
      timestep_sampling="uniform",
      lognormal_mean=-1.2,
      lognormal_std=1.2,
  )
  config.ldm = dict(
      denoiser="unet",
      latent="spatial",  # What the VAE checkpoint must provide for this denoiser.
      class_dropout=0.1,
      # Parameter average used for eval and sampling. "halflife" (EDM) ramps
      # the half-life up with the images seen, so it is right at any run
      # length; "power" is EDM2's; "constant" is the plain decay (long runs only).
      ema=dict(schedule="halflife", decay=0.9999, halflife_images=500_000,
               rampup_ratio=0.05, power_std=0.05),
      scale_batches=8,  # Train batches encoded at start to measure the latent scale.
      # Encode every train image once per start (as stored and mirrored) and
      # look posteriors up instead of running the encoder at each step; needs
      # data.crop_padding=0. Holds 2 x 50k posteriors on the host (819 MB at
      # 16x16x4 in float32). On 2 CPU cores it made the CPU recipe's step
      # 1.11x faster and took 2 min to build (bench/README.md, round 10).
      cache_latents=False,
  )
  config.unet = dict(
      channels=128,
      channel_multipliers=(1, 2, 2),
      num_res_blocks=2,
      attention_levels=(1, 2),
      num_heads=4,
      context_dim=256,
      context_tokens=4,  # The class embedding is split into this many cross-attention tokens.
      # Width of a GELU MLP in each attention block, in channels (0: none).
      # None, as in ADM's attention blocks and diffusers' UNet2DModel (4 gives
      # latent diffusion's transformer block): at the CPU recipe's size and an
      # equal budget the MLP-free blocks tied twice (FID-512 / FID-2k 137.3 /
      # 98.8 against 137.7 / 100.4 in round 14, 104.6 / 64.0 against 105.8 /
      # 65.0 in round 20, docs/results.md), and the MLP costs 0.44 of 3.85 s
      # per issue-8 step on 2 CPU cores (bench/README.md, round 20). Not yet
      # compared at this recipe's size.
      attention_mlp_ratio=0,
      dropout=0.1,
      # The most groups of any GroupNorm (Stable Diffusion's 32); see
      # models/layers.DEFAULT_NORM_GROUPS for why narrow models want fewer.
      norm_groups=32,
  )

  config.train.batch_size = 128
  config.train.num_steps = 200_000
  config.train.eval_every = 5_000
  config.train.checkpoint_every = 5_000
  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 1_000
  config.eval.num_examples = 2_000
  # The run's sampler: its eval pictures use it and sample.py defaults to it
  # (a main job writes its `sample` settings here).
  config.eval.sampler = "dpm_solver"
  config.eval.sample_steps = 20
  config.eval.guidance = 2.0
  config.eval.clip_x0 = ml_collections.config_dict.placeholder(float)  # None: no clipping.
  config.eval.picture_classes = 10  # Rows of the sample grid written at each eval.
  return config
