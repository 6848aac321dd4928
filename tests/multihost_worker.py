"""One process of the multi-process checks in tests/test_multihost.py.

  python -m ldm_jax.launch ... -- python tests/multihost_worker.py ldm|fid ARGS.json

`ldm` trains the tiny LDM with the given config (the test passes that of
tests/conftest.py's shared run; its final eval draws the samples picture) and
saves the final parameters; `fid` computes FID features and statistics of
fixed images with the given Inception weights. Each process saves what it got
as <out>/process_<i>.npz, for the test to compare with a single process.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def fid_images() -> np.ndarray:
  # Three images in batches of two: the second batch is padded.
  return np.random.default_rng(5).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


def fid_outputs(weights: str, mesh) -> dict[str, np.ndarray]:
  """On a 2-device mesh, 2 images a step: the shapes tests/test_fid_cli.py
  compiles, so a single-process suite compiles them once."""
  from ldm_jax.fid import extractor, stats
  model = extractor.FIDModel.load(weights, mesh=mesh)
  features = model.features(fid_images(), batch_size=2, progress=False)
  mu, sigma = stats.feature_statistics(features)
  return dict(features=features, mu=mu, sigma=sigma)


def main(mode: str, args_path: str) -> None:
  from ldm_jax import parallel
  parallel.initialize_distributed()
  import jax
  import ml_collections
  from ldm_jax import train_loop
  with open(args_path) as f:
    args = json.load(f)
  if mode == "ldm":
    state = train_loop.train_and_evaluate(ml_collections.ConfigDict(args["config"]),
                                          args["workdir"])
    # Replicated: every process holds all of each parameter.
    outputs = {f"param_{i}": np.asarray(x.addressable_shards[0].data)
               for i, x in enumerate(jax.tree.leaves(state.params))}
  elif mode == "fid":
    outputs = fid_outputs(args["fid_weights"], parallel.make_mesh())
  else:
    raise ValueError(f"unknown mode {mode!r}")
  np.savez(os.path.join(args["out"], f"process_{jax.process_index()}.npz"),
           process_count=jax.process_count(), device_count=jax.device_count(), **outputs)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
