"""Trains ldm-jax: the main job (both stages, samples, FID) or a single stage.

  python train.py --config=configs/cifar100_cpu.py --workdir=runs/main \
      --config.data.source=DIR --config.fid.reference=STATS.npz
  python train.py --config=configs/cifar100_vae.py --workdir=runs/vae
  python train.py --config=configs/cifar100_ldm.py --workdir=runs/ldm \
      --config.vae_checkpoint=runs/vae

Any config value can be overridden (--config.train.batch_size=256); a mistyped
key or a wrong type stops here, before anything runs. Rerunning a command on
the same workdir resumes it.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from ldm_jax import cli, parallel

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file in configs/.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and pictures go.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None,
    "Call jax.distributed.initialize() for a multi-host run "
    "(default: when LDM_JAX_DISTRIBUTED=1).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Metrics go to stdout through the loop; libraries' INFO chatter (orbax
  # logs every checkpoint file it writes) stays out of the way.
  logging.set_verbosity(logging.WARNING)
  parallel.initialize_distributed(_DISTRIBUTED.value)
  # After distributed start-up, which must come first.
  from ldm_jax import pipeline, train_loop
  if pipeline.is_pipeline(_CONFIG.value):
    results = pipeline.run(_CONFIG.value, _WORKDIR.value)
    print(pipeline.summary(results))
  else:
    train_loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)  # Errors: one line and exit status 2 (traceback: --debug).
