"""The main job sized for one hour on a 2-core CPU: VAE, LDM, samples, FID.

  python train.py --config=configs/cifar100_cpu.py --workdir=runs/cpu \
      --config.data.source=../shared/data/cifar100 \
      --config.fid.reference=../shared/data/fid/cifar100_train_stats.npz

The two stage recipes of configs/cifar100.py, shrunk until the whole job fits
the hour; every choice below was ranked by short runs at an equal budget on
this machine (docs/results.md has the table, losers included).

Reached (2 CPU cores, 1 device; docs/results.md):
  round 22, v-prediction with Min-SNR-5 weighting, the LDM trained at
    ad32dc7 with those overrides on the VAE that the main-job command
    trained there (runs/base22/vae, test PSNR 29.16 dB as final16's; its
    reconstruction FID-2k, 32.1, is round 21's, not measured again;
    runs/vminsnr5): FID-512 101.1, FID-2k 62.0; training seed 1: 103.7 /
    62.0 (eps: 103.3 / 63.3 and 107.5 / 66.5). The same steps and batch as
    round 21. The committed recipe at 0b7ef16 on the same VAE, alone
    (runs/check22): the same FIDs to every digit; LDM 22.6 + samples 1.5 +
    FID 2.0 min (sample FIDs only), VAE 9.1 min (runs/base22) on a machine
    that ran the VAE stage 1.26x slower than final16's.
  round 21, GroupNorms of four channels per group in both stages
    (norm_groups=8; 32 groups had made every 32-wide norm an instance norm,
    which lost each image's mean colour), the stages trained at 6499a0b
    with those overrides (runs/vae_g8, then the main-job command,
    runs/r21_g8u8): FID-512 103.3, FID-2k 63.3, VAE reconstruction FID-2k
    32.1 (test PSNR 29.2 dB); VAE 7.5 + LDM 21.9 + samples 1.6 + FID 4.4 =
    35.4 min alone. The VAE alone changed: 106.8 / 65.2 (runs/r21_g8).
    Trained end to end from scratch at d9342a2 (runs/final16): the same
    FIDs to every digit, 36.8 min alone (VAE 7.2 + LDM 23.6 + samples 1.7 +
    FID 4.3).
  round 20, attention blocks without their MLP and 4,150 LDM steps instead
    of 3,500 (the same cost), the LDM trained at 509174c on final14's VAE
    (runs/r20_nomlp): FID-512 104.6, FID-2k 64.0, VAE reconstruction FID-2k
    34.6. Trained end to end from scratch at 20dc20b (runs/final15): the
    same FIDs to every digit, 36.4 min alone on a machine 1.16x slower than
    round 18's (VAE 7.4 + LDM 23.4 + samples 1.4 + FID 4.2).
  round 18, the sampler now w=5 plus autoguidance 2 by the LDM's own step
    700, trained end to end at 99b4906 (runs/final14): FID-512 105.8,
    FID-2k 65.0, VAE reconstruction FID-2k 34.6; 34.7 min alone (VAE 7.3 +
    LDM 21.7 + samples 1.6 + FID 4.1). Its stages are round 17's bit for
    bit (the same FIDs to every digit as sampling round 17's; w=10 alone
    scored 113.3 / 73.2 on them).
  round 17, the same recipe at 4e9f240 (GroupNorm's gradient by hand,
    dropout masks by hash), trained end to end again (runs/final13):
    FID-512 113.3, FID-2k 73.2, VAE reconstruction FID-2k 34.6; 35.0 min
    alone (VAE 7.1 + LDM 22.5 + samples 1.1 + FID 4.2).
  round 16, as committed at 175e692 (VAE learning rate 2e-3; convolutions
    on oneDNN, ldm_jax/kernels), trained end to end (runs/final12):
    FID-512 113.0, FID-2k 73.5, VAE reconstruction FID-2k 34.7; 34.9 min
    alone (VAE 7.5 + LDM 21.9 + samples 1.0 + FID 4.4). The same VAE
    recipe trained with XLA's convolutions, then the main job on it:
    112.8 / 73.9 (reconstruction 34.7).
  round 15, as committed at 9d78078 (the VAE trained 800 steps, one epoch,
    instead of 400), trained end to end (runs/final11): FID-512 115.7,
    FID-2k 75.3, VAE reconstruction FID-2k 39.6; the FIDs of v800 below to
    every digit; 53.7 min with a guidance sweep sharing the cores for its
    first 26.
    The same stages trained at 8c7e831 with the VAE steps overridden (v800):
    115.7 / 75.3 in 37.9 min (VAE 10.0 + LDM 22.1 + samples 1.0 + FID 4.7),
    against 137.7 / 100.4 with the 400-step VAE (reconstruction FID-2k
    67.7). A 1,200-step VAE (32.0) with 2,800 LDM steps, about the same
    cost: 118.1 / 76.8, a tie. On the slowest machine this project has
    run on (round 8's), by its stage times, about 57 min: VAE 13.4 (twice
    its 6.7), LDM about 37 (its 0.71 s/step less the latent cache's 1.11x),
    samples 1.4, FID 5.5.
  round 14, as committed at c131832, trained end to end on another fresh
    machine (runs/final10): FID-512 137.7, FID-2k 100.4 (the same as round
    12's to the digits shown), VAE reconstruction FID-2k 67.7; whole job
    35.3 min (VAE 5.0 + LDM 24.5 + samples 1.1 + FID 4.8) on a machine
    1.6x slower than round 13's on the issue-8 step. The same without the
    attention MLP at about the same cost (attention_mlp_ratio=0, 4,450 LDM
    steps): 137.3 / 98.8, a tie.
  round 12, this recipe as committed at 7fed53d, trained end to end on a
    fresh machine (runs/final9): FID-512 137.7, FID-2k 100.4, VAE
    reconstruction FID-2k 67.7; whole job 30.4 min (VAE 3.9 + LDM 22.2 +
    samples 0.8 + FID 3.5). That machine ran the VAE stage 1.7x faster than
    round 8's; scaled by it, the job takes about 52 min there.
  round 10, LDM lr 4e-3 at 3,000 steps without the latent cache (b887dc3,
    runs/final8_lr4e3): FID-512 137.0, FID-2k 99.6; 39.9 min on that
    round's machine. At 8e-3 on the same VAE: 138.9, 101.9.
  round 9, LDM learning rate 2e-3, at f184d6a on round 8's VAE (runs/final7):
    FID-512 139.5, FID-2k 102.2, VAE reconstruction FID-2k 67.6; whole job
    about 48.7 min alone (VAE 6.7 + LDM 35.4 + samples 1.4 + FID 5.2: the
    LDM and VAE times are round 8's for the same steps and models, since
    this run shared the cores with the ranking runs).
  round 8 (lr 1e-3), trained end to end at 43eabbf (runs/final6): FID-512 144.8,
    FID-2k 110.1, VAE reconstruction FID-2k 67.6; whole job
    48.9 min (VAE 6.7 + LDM 35.4 + samples 1.4 + FID 5.5).
  round 7 (3,000 LDM steps; dpm_solver-10, w=10, x0 clip 3, EMA):
    FID-512 144.4, FID-2k 110.0, VAE reconstruction FID-2k 67.6; whole job
    54.7 min (VAE 8.1 + LDM 39.7 + samples 1.6 + FID 5.3; the two stages
    trained at 2f0688f, whose training recipe this is; sampled and scored
    in round 7 with --config.sample.steps=10 before it became the default).
  commit 7c4e420 (dpm_solver-20): FID-512 145.4, FID-2k 111.1; 56.7 min
    (samples 3.0, FID 5.9).
  commit 2f0688f (the same model sampled at w=2): FID-512 158.2, FID-2k
    125.6; 56.8 min (VAE 8.1 + LDM 39.7 + samples 3.3 + FID 5.5).
  commit a195d17 (1,800 LDM steps): FID-512 169.9, FID-2k 138.4; 40.6 min
    (VAE 8.1, LDM 23.5, samples 3.2, FID 5.7), VAE test PSNR 23.2 dB.
  commit 88b4e44 (round 2: YNNPACK convolutions, dropout 0.1, no clip,
    1,400 steps): FID-512 186.0, FID-2k 152.6; 61.7 min.
The original reported FID-512 157.55 after 8 GPU-hours.

The sampler below becomes the LDM run's own, so `python sample.py
--workdir=runs/cpu/ldm --out=OUT` samples with it (dpm_solver-10, w=5,
autoguidance 2 by the run's step 700, clip 3) unasked.
"""

from configs import cifar100_ldm, cifar100_vae
from ldm_jax import pipeline


def get_config():
  vae = cifar100_vae.get_config()
  # 16x16x4 latent (f=2). Four channels per GroupNorm group (norm_groups=8):
  # with 32 groups a 32-wide model normalises each channel alone, which
  # removed each image's mean colour (34 % of the reconstruction error); with
  # 8, test PSNR 27.6 -> 29.2 dB and reconstruction FID-2k 34.6 -> 32.1 at
  # the same cost; one group: 28.4 dB, 38.6 (docs/results.md, round 21). An
  # adversarial term (vae.adversarial) tied: 34.2 against 34.7.
  vae.vae.model.update(channels=32, num_res_blocks=1, norm_groups=8)
  # 800 steps (51k images, one epoch): the reconstruction FID-2k that bounds
  # the LDM went 67.7 -> 39.6 from 400 steps (1,200: 32.0), and the job's
  # FID-512 / FID-2k 137.7 / 100.4 -> 115.7 / 75.3 for 5 more minutes
  # (docs/results.md, round 15).
  vae.train.update(batch_size=64, num_steps=800, eval_every=800, checkpoint_every=100,
                   log_every=25)
  # lr 2e-3 (round 16): reconstruction FID-2k 39.6 -> 34.7 at 800 steps, the
  # job (same LDM) 115.7 / 75.3 -> 112.8 / 73.9; at 400 steps 67.7 -> 58.5.
  vae.optim.update(learning_rate=2e-3, warmup_steps=50)
  vae.eval.num_examples = 1_000

  ldm = cifar100_ldm.get_config()
  # No dropout: a run this short underfits (FID-512 218.9 without against
  # 222.4 with 0.1 at 500 steps, equal eval loss).
  # The attention blocks have no MLP (the stage recipe's default): against
  # a 4x GELU MLP at the same cost (4,150 steps against 3,500; 0.27 against
  # 0.32 s/step), FID-512 / FID-2k 104.6 / 64.0 against 105.8 / 65.0 (round
  # 20) and 137.3 / 98.8 against 137.7 / 100.4 (round 14): ties, and the
  # MLP-free step is 1.19x faster.
  # A third level (multipliers (1, 2, 2), attention at 8x8 and 4x4) at equal
  # cost (3,100 steps) lost: FID-512 / FID-2k 113.5 / 74.4 against 105.8 /
  # 65.0 (round 19).
  # norm_groups=8 for the same reason as the VAE's: on the norm_groups=8
  # VAE, FID-512 / FID-2k 103.3 / 63.3 against 106.8 / 65.2 with 32 groups
  # (round 21; within the seed spreads, the best figures measured).
  ldm.unet.update(channels=32, channel_multipliers=(1, 2), num_res_blocks=1,
                  attention_levels=(1,), context_dim=128, dropout=0.0, norm_groups=8)
  # v-prediction with Min-SNR-5 weighting. At the full budget it scored ahead
  # of the original's plain eps loss at both training seeds tried: FID-512 /
  # FID-2k 101.1 / 62.0 and 103.7 / 62.0 against 103.3 / 63.3 and 107.5 /
  # 66.5 (means 102.4 / 62.0 against 105.4 / 64.9, about one seed spread);
  # eps with Min-SNR-5 tied eps (104.9 / 63.7; round 22). In short runs
  # (500 steps, lr 1e-3, no clip) it had lost, 236.5 against 221.6.
  ldm.diffusion.update(prediction="v", loss_weighting="min_snr", min_snr_gamma=5.0)
  # 4,150 steps cost what 3,500 with the attention MLP did: 22 min on round
  # 12's machine, about 30 min on round 10's and about 41 min on round 8's
  # slower one; the whole job stays under the hour on all three (with round
  # 15's 800-step VAE, about 57 min on round 8's). Round 20's machine: the
  # LDM stage 23.2 and 23.4 min in two runs.
  # Batch 128 at the same wall time (2,150 steps; it runs more images per
  # second here) tied: 111.3 / 73.6 against 113.3 / 73.2, and 112.8 / 73.1
  # at lr 8e-3 (round 17).
  ldm.train.update(batch_size=64, num_steps=4_150, eval_every=4_150, checkpoint_every=700,
                   log_every=50)
  # Learning rate ranked at 1,000 steps (equal cost, FID-512): 1e-3 172.7,
  # 2e-3 160.6, 4e-3 148.2, 8e-3 144.4. At 3,000 steps (FID-512 / FID-2k):
  # 1e-3 144.8 / 110.1, 2e-3 139.5 / 102.2, 4e-3 137.0 / 99.6, 8e-3
  # 138.9 / 101.9 (docs/results.md, rounds 9 and 10): 2e-3 to 8e-3 lie
  # within the training-seed spread (2.3 FID-512, 3.8 FID-2k between two
  # seeds, round 12); 4e-3 is the lowest of them. Width 48 at equal cost
  # (2,500 steps) tied: 135.5 / 98.9.
  ldm.optim.update(learning_rate=4e-3, warmup_steps=100)
  # The posteriors are computed once per start (2 min) instead of at every
  # step: 0.49 -> 0.44 s/step (bench/bench_train.py), which pays for itself
  # after about 2,800 steps.
  ldm.ldm.cache_latents = True
  ldm.eval.num_examples = 1_000

  config = pipeline.base_pipeline_config(vae, ldm)
  # Flips only, as DDPM and EDM train CIFAR: the original's zero-padded crop
  # (data.crop_padding=4) teaches both stages black borders.
  config.data.crop_padding = 0
  # Chosen for eps, kept for v, where it neither helps nor hurts (FID-2k
  # 62.0 with it, 61.2 without, same labels and seed; round 22).
  # The eps network's x0 estimates near t = T are its small eps error divided
  # by alpha_T = 0.006: unclipped, sampled latents end 7x wider than encoded
  # ones (saturated blobs). Clipping at 3 std: FID-512 186.0 -> 177.2 on the
  # 1,400-step model (2 -> 184.8, 4.5 -> 177.8).
  config.sample.clip_x0 = 3.0
  # Guidance measured on the 3,000-step model (dpm_solver-20, clip 3):
  # FID-2k 125.6 at w=2, 116.9 at 5, 113.5 at 7, 111.1 at 10, 113.1 at 15;
  # FID-512 158.1 at 2, 150.8 at 5, 146.1 at 10 (docs/results.md: every run).
  # On round 15's model (800-step VAE), dpm_solver-10: FID-2k 77.0 at 5,
  # 74.5 at 7, 75.3 at 10, 79.7 at 15: as flat, so 10 stays.
  # Round 18: classifier-free guidance at w=5 plus autoguidance of weight 2
  # by the LDM's own step-700 EMA model (kept: ldm_stage.train.keep_steps),
  # on final13's stages: FID-2k 73.2 -> 65.0 (guide step 1,400: 65.1; w=7:
  # 66.9). Autoguidance alone (w=1) lost to guidance alone, and guidance
  # limited to a noise interval tied (docs/results.md, round 18). Three model
  # calls per step instead of two: sampling took 1.45-1.64x as long. A
  # smaller guide (16 channels, its own run) scored FID-2k 66.0-66.9, and
  # stochastic DDIM (eta 1) 65.5 at 25 steps, 64.5 at 50, at 2.2-4.3x the
  # sampling time (round 19).
  config.sample.guidance = 5.0
  config.sample.autoguidance = 2.0
  config.sample.guide_step = 700
  # Steps measured at w=10 (FID-2k, same labels and seed): dpm_solver-10
  # 110.0, dpm_solver-20 111.1, ddim-50 112.1, ddpm-1000 112.9. Ten steps
  # score as well as any and sample in half the time of twenty.
  config.sample.steps = 10
  return config
