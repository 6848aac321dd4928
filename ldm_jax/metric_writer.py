"""Metrics to three places at once: the log, `metrics.jsonl` and TensorBoard.

Only process 0 writes; the others get a writer that does nothing, so the loop
never has to ask which process it is on.

A run that resumes from step s was preceded by one that may have logged steps
after s and died before saving them; they are logged again. So a writer opened
with `resume_step=s` first drops the records after s: it rewrites
metrics.jsonl without them (atomically), and starts its TensorBoard event file
with a session-start event at s + 1, which tells TensorBoard to discard the
earlier files' events from that step on. TensorBoard events are written
synchronously, so `flush()` puts every record logged so far on disk: the loop
calls it before each checkpoint, and a checkpointed step never loses its
records.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
from tqdm import tqdm

from ldm_jax import files

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricWriter:

  def __init__(self, workdir: str, *, enabled: bool | None = None,
               resume_step: int | None = None):
    """`resume_step`: the step the run restarts from (0 for a fresh start);
    records of later steps are dropped. None keeps everything."""
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tensorboard = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, METRICS_FILE)
      if resume_step is not None:
        drop_records_after(path, resume_step)
      self._jsonl = open(path, "a", buffering=1)
      self._tensorboard = _EventFile(
          os.path.join(workdir, TENSORBOARD_DIR),
          purge_from=None if resume_step is None else resume_step + 1)

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
      self._tensorboard.scalar(step, name, value)

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    if self.enabled:
      self._tensorboard.image(step, name, np.asarray(image))

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      self._tensorboard.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()
      self.enabled = False


def read_records(path: str) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl; a line cut short by a killed process
  (the only way one can be malformed) is skipped."""
  records = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
          records.append(record)
  return records


def drop_records_after(path: str, step: int) -> None:
  """Rewrites metrics.jsonl with only the records of steps <= `step`; the
  file is replaced in one rename, so a crash leaves either version whole."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = [json.dumps(r) + "\n" for r in read_records(path) if r["step"] <= step]
  if kept == lines:
    return
  with files.atomic_write(path) as f:
    f.writelines(kept)


class _EventFile:
  """A TensorBoard event file written synchronously (tensorboardX's
  SummaryWriter queues events for a background thread, so a flush there does
  not mean they are on disk)."""

  def __init__(self, logdir: str, purge_from: int | None):
    EventsWriter, self._event_pb2, self._summary = _import_tensorboardx()
    os.makedirs(logdir, exist_ok=True)
    # The pid keeps two runs started within a second from sharing a file name.
    self._writer = EventsWriter(os.path.join(logdir, "events"), f".{os.getpid()}")
    if purge_from is not None:
      # TensorBoard drops the events of earlier files at or after this step.
      self._writer.write_event(self._event_pb2.Event(
          wall_time=time.time(), step=purge_from,
          session_log=self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START)))

  def _write(self, step: int, summary) -> None:
    self._writer.write_event(self._event_pb2.Event(wall_time=time.time(), step=step,
                                                   summary=summary))

  def scalar(self, step: int, name: str, value: float) -> None:
    self._write(step, self._summary.scalar(name, value))

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    self._write(step, self._summary.image(name, image, dataformats="HWC"))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def _import_tensorboardx():
  """tensorboardX's (EventsWriter, event_pb2, summary): event files without
  TensorFlow. Its package imports torch when that is installed, only to accept
  torch tensors, which are never passed here; torch is hidden from that import
  because it adds seconds to the start of every run."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # Makes `import torch` raise ImportError.
  try:
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    from tensorboardX.event_file_writer import EventsWriter  # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  except ImportError:
    if not hide:
      raise
    del sys.modules["torch"]
    hide = False
    for name in [n for n in sys.modules if n == "tensorboardX" or n.startswith("tensorboardX.")]:
      del sys.modules[name]
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    from tensorboardX.event_file_writer import EventsWriter  # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  finally:
    if hide:
      del sys.modules["torch"]
  return EventsWriter, event_pb2, summary


def _to_float(value: Any) -> float:
  return float(np.asarray(value))


def _format(value: float) -> str:
  return f"{value:.4g}"
