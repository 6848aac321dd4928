"""Metrics to three places at once: the log, `metrics.jsonl` and TensorBoard.

Only process 0 writes; the others get a writer that does nothing, so the loop
never has to ask which process it is on.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
from tqdm import tqdm


class MetricWriter:

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tensorboard = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
      from tensorboardX import SummaryWriter  # Event files without TensorFlow.
      self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "") -> None:
    if not self.enabled or not metrics:
      return
    scalars = {f"{prefix}{k}": _to_float(v) for k, v in metrics.items()}
    # tqdm.write keeps the line clear of a progress bar; absl's INFO level is
    # left to the libraries (orbax logs every checkpoint step there).
    tqdm.write(f"step {step}: " + ", ".join(
        f"{k}={_format(v)}" for k, v in sorted(scalars.items())))
    self._jsonl.write(json.dumps({"step": step, "time": time.time(), **{
        k: (v if math.isfinite(v) else str(v)) for k, v in scalars.items()}}) + "\n")
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, value, step)

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    if self.enabled:
      self._tensorboard.add_image(name, np.asarray(image), step, dataformats="HWC")

  def flush(self) -> None:
    if self.enabled:
      self._tensorboard.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()
      self.enabled = False


def _to_float(value: Any) -> float:
  return float(np.asarray(value))


def _format(value: float) -> str:
  return f"{value:.4g}"
