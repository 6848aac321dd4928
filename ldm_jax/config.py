"""Config building blocks shared by every recipe in configs/, and config checks.

A recipe (configs/*.py) calls `base_config()` and sets what makes it what it
is. Keeping the common sections here means a new key appears in every recipe
at once, and `config_flags` can then reject a mistyped override
(`--config.train.bach_size=...`) or a wrong type before anything runs.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import ml_collections

from ldm_jax import data

# Keys that may change between a run and its resumption: how long, how often,
# where the data lives, and the peak learning rate (the schedule is rebuilt
# from it on every start and the optimiser state does not depend on it; a
# lower one is how a run that diverged goes on from its last good checkpoint).
# Anything else changes the model, the optimisation or the data stream, so
# resuming under it would silently mix two experiments.
RESUMABLE_KEYS = (
    "train.num_steps",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.keep_steps",
    "train.progress_bar",
    "optim.learning_rate",
    "train.compute_dtype",  # Parameters are float32 either way.
    "eval",
    "data.data_dir",
    "data.source",
    "data.worker_count",
    "fid",
    "vae_checkpoint",
    "ldm.cache_latents",  # The same stream and posterior samples either way.
)


def base_config() -> ml_collections.ConfigDict:
  """The sections every stage has, with defaults sized for one GPU."""
  config = ml_collections.ConfigDict()
  config.stage = ""  # "vae" or "ldm": picks the loss and what eval shows.
  config.seed = 0
  config.data = data.default_data_config()

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 128  # Global, over all devices and hosts.
  config.train.num_steps = 100_000
  config.train.log_every = 100
  config.train.eval_every = 5_000
  config.train.checkpoint_every = 5_000
  config.train.keep_checkpoints = 3  # Latest N; the best by eval loss is kept too.
  # Steps saved as well and never deleted, e.g. the guide of autoguidance
  # (sampling.SamplerSettings.guide_step), an earlier state of the same run.
  config.train.keep_steps = ()
  config.train.progress_bar = True
  config.train.compute_dtype = "float32"  # "bfloat16": mixed precision, float32 params.

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 2e-4  # Peak, after warmup; cosine decay to end.
  config.optim.warmup_steps = 1_000
  config.optim.final_learning_rate_fraction = 0.01
  config.optim.weight_decay = 0.0
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.grad_clip_norm = 1.0

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 256
  config.eval.num_examples = ml_collections.config_dict.placeholder(int)  # None = whole split.
  config.eval.picture_examples = 8  # Columns in the reconstruction / sample picture.

  config.fid = ml_collections.ConfigDict()
  config.fid.every = 0  # Steps between FID evaluations during training; 0 = off.
  config.fid.num_samples = 2_048
  config.fid.weights = ml_collections.config_dict.placeholder(str)
  return config


def shrink_for_smoke_runs(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Run-size settings for the tiny recipes: a few steps, small batches, a
  small eval, so that a run finishes in seconds on a CPU."""
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
  return config


# Keys added after runs were saved, with the value those runs used (the
# code's default then), so that such runs still resume.
ADDED_KEYS = {"unet.attention_mlp_ratio": 4, "unet.norm_groups": 32, "vae.model.norm_groups": 32,
              "vae.adversarial.weight": 0.0, "vae.adversarial.start_step": 0,
              "vae.adversarial.critic_channels": 64, "vae.adversarial.critic_levels": 2}


def flatten(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
  """{'train.batch_size': 128, ...}: the leaves of a nested config."""
  items = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
  flat = {}
  for key, value in items.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(flatten(value, name + "."))
    else:
      flat[name] = list(value) if isinstance(value, tuple) else value
  return flat


def to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """A JSON-ready nested dict (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def incompatible_keys(saved: dict[str, Any], new: ml_collections.ConfigDict,
                      resumable: Iterable[str] = RESUMABLE_KEYS) -> list[str]:
  """Keys whose values differ in a way that forbids resuming `saved` as `new`."""
  old_flat, new_flat = flatten(saved), flatten(to_json(new))

  def may_change(key):
    return any(key == r or key.startswith(r + ".") for r in resumable)

  keys = sorted(set(old_flat) | set(new_flat))
  return [k for k in keys
          if not may_change(k)
          and old_flat.get(k, ADDED_KEYS.get(k, "<absent>")) != new_flat.get(k, "<absent>")]


def check_resumable(saved: dict[str, Any], new: ml_collections.ConfigDict, where: str) -> None:
  """Refuses to continue a run whose saved config differs in what matters."""
  bad = incompatible_keys(saved, new)
  if bad:
    old_flat, new_flat = flatten(saved), flatten(to_json(new))
    lines = [f"  {k}: saved {old_flat.get(k, '<absent>')!r}, now {new_flat.get(k, '<absent>')!r}"
             for k in bad]
    raise ValueError(
        f"{where} holds a run with a different config, so it cannot be resumed "
        "with this one (nothing was changed there):\n" + "\n".join(lines) +
        "\nUse a new --workdir, or restore those values. Only these may change "
        f"on resume: {', '.join(RESUMABLE_KEYS)}.")
