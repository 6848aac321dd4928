"""Bad input to each command line: one clear message, a non-zero exit status,
no traceback, and nothing on disk changed or created.

The table covers train.py, sample.py, `python -m ldm_jax.data prepare` and
`python -m ldm_jax.fid`. Every case is a real process (each pays the imports,
a few seconds), so the module runs them all at once, a few at a time, and the
tests then check one case each. (Errors that the in-process tests already
cover through the same code, e.g. an unknown sampler or a missing FID input,
are left to them.)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import write_fake_cifar_npz

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# An HTTP proxy nobody listens on: a download fails at once, as offline.
_OFFLINE = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
            "no_proxy": "", "NO_PROXY": ""}


@dataclasses.dataclass
class Case:
  name: str
  argv: list[str]  # After `python`.
  expected: list[str]  # Each must be in the error message.
  status: int = 2
  unchanged: list[str] = dataclasses.field(default_factory=list)  # Exist; must not change.
  absent: list[str] = dataclasses.field(default_factory=list)  # Must not come into being.
  env: dict[str, str] = dataclasses.field(default_factory=dict)


def _snapshot(path):
  """The bytes of every file under `path` (or of `path`), by relative name."""
  if os.path.isfile(path):
    with open(path, "rb") as f:
      return {".": f.read()}
  found = {}
  for directory, subdirs, names in os.walk(path):
    for name in subdirs:
      found[os.path.relpath(os.path.join(directory, name), path) + "/"] = b""
    for name in names:
      full = os.path.join(directory, name)
      with open(full, "rb") as f:
        found[os.path.relpath(full, path)] = f.read()
  return found


def _cases(root, data_dir, vae_workdir):
  a_file = root / "notes.txt"
  a_file.write_text("a regular file, not a directory")
  empty_dir = root / "empty_run"
  empty_dir.mkdir()
  # Numpy shards without SHA256SUMS (a supported source), one cut short.
  shards = write_fake_cifar_npz(root / "shards", num_train=8, num_test=4)
  cut = shards / "cifar100_train_2of4.npz"
  cut.write_bytes(cut.read_bytes()[:300])
  short_npz = root / "short.npz"
  np.savez(short_npz, images=np.zeros((2, 8, 8, 3), np.uint8))
  short_npz.write_bytes(short_npz.read_bytes()[:200])
  new = lambda name: str(root / name)  # A path nothing may create.
  vae = ["train.py", "--config=configs/tiny_vae.py"]
  on_data = f"--config.data.data_dir={data_dir}"
  prepare = ["-m", "ldm_jax.data", "prepare"]
  return [
      Case("train: mistyped config key",
           vae + [f"--workdir={new('w1')}", "--config.train.batch_sz=16"],
           ["unknown config key 'batch_sz'", 'Did you mean "batch_size"'], absent=[new("w1")]),
      Case("train: config file missing",
           ["train.py", "--config=configs/no_such_recipe.py", f"--workdir={new('w2')}"],
           ["configs/no_such_recipe.py", "No such file"], absent=[new("w2")]),
      Case("train: workdir is a file", vae + [f"--workdir={a_file}", on_data],
           [f"--workdir {a_file} is a file, not a directory"], unchanged=[str(a_file)]),
      Case("train: batch size not a multiple of the devices",
           vae + [f"--workdir={new('w3')}", on_data, "--config.train.batch_size=12"],
           ["global batch size (12)", "multiple of the number of devices (8)"],
           absent=[new("w3")]),
      Case("train: LDM without its VAE",
           ["train.py", "--config=configs/tiny_ldm.py", f"--workdir={new('w4')}", on_data],
           ["--config.vae_checkpoint"], absent=[new("w4")]),
      Case("train: LDM on a VAE workdir that does not exist",
           ["train.py", "--config=configs/tiny_ldm.py", f"--workdir={new('w5')}", on_data,
            f"--config.vae_checkpoint={new('no_vae')}"],
           [f"{new('no_vae')} holds no checkpoints"], absent=[new("w5"), new("no_vae")]),
      Case("train: no data and no internet",
           vae + [f"--workdir={new('w6')}", f"--config.data.data_dir={new('tfds')}"],
           ["could not download", "--from"], absent=[new("w6"), new("tfds")], env=_OFFLINE),
      Case("sample: workdir without checkpoints",
           ["sample.py", f"--workdir={empty_dir}", f"--out={new('o1')}"],
           ["holds no checkpoints"], unchanged=[str(empty_dir)], absent=[new("o1")]),
      Case("sample: a VAE workdir",
           ["sample.py", f"--workdir={vae_workdir}", f"--out={new('o2')}"],
           ["is a 'vae' run", "needs an LDM run"], unchanged=[vae_workdir],
           absent=[new("o2")]),
      Case("sample: out is a file",
           ["sample.py", f"--workdir={vae_workdir}", f"--out={a_file}"],
           [f"--out {a_file} is a file"], unchanged=[str(a_file)]),
      Case("data: truncated shard without SHA256SUMS",
           prepare + [f"--data_dir={new('d1')}", f"--from={shards}"],
           [str(cut), "not a readable .npz file"], unchanged=[str(shards)],
           absent=[new("d1")]),
      Case("data: source missing", prepare + [f"--data_dir={new('d2')}", f"--from={new('src')}"],
           [new("src"), "no such file"], absent=[new("d2")]),
      Case("data: no internet", prepare + [f"--data_dir={new('d3')}"],
           ["could not download"], absent=[new("d3")], env=_OFFLINE),
      Case("data: data_dir is a file", prepare + [f"--data_dir={a_file}", f"--from={shards}"],
           [f"--data_dir {a_file} is a file"], unchanged=[str(a_file)]),
      Case("fid: truncated .npz", ["-m", "ldm_jax.fid", str(short_npz), str(short_npz)],
           [str(short_npz), "not a readable .npz file"], status=1,
           unchanged=[str(short_npz)]),
  ]


def _run(case):
  before = {path: _snapshot(path) for path in case.unchanged}
  done = subprocess.run([sys.executable] + case.argv, cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, **case.env), timeout=600)
  after = {path: _snapshot(path) for path in case.unchanged}
  return done, before, after


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, tiny_data_dir, vae_workdir):
  root = tmp_path_factory.mktemp("bad_inputs")
  cases = _cases(root, tiny_data_dir, vae_workdir)
  with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
    results = list(pool.map(_run, cases))
  assert [case.name for case in cases] == CASE_NAMES
  return {case.name: (case, *result) for case, result in zip(cases, results)}


CASE_NAMES = [
    "train: mistyped config key", "train: config file missing", "train: workdir is a file",
    "train: batch size not a multiple of the devices", "train: LDM without its VAE",
    "train: LDM on a VAE workdir that does not exist", "train: no data and no internet",
    "sample: workdir without checkpoints", "sample: a VAE workdir", "sample: out is a file",
    "data: truncated shard without SHA256SUMS",
    "data: source missing", "data: no internet", "data: data_dir is a file",
    "fid: truncated .npz",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_is_one_clear_error_and_changes_nothing(outcomes, name):
  case, done, before, after = outcomes[name]
  report = f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}"
  assert done.returncode == case.status, report
  assert "Traceback" not in done.stderr, report
  errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, report
  for text in case.expected:
    assert text in errors[0], (text, report)
  assert after == before, report
  for path in case.absent:
    assert not os.path.exists(path), (path, report)
