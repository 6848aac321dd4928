"""Rehearses a multi-host run on one machine: N JAX processes on CPU.

  python -m ldm_jax.launch --num_processes=2 --devices_per_process=1 -- \\
      python train.py --config=configs/tiny_vae.py --workdir=/tmp/two_hosts

Every process runs the same command, as every host of a cluster would, with
`LDM_JAX_DISTRIBUTED=1` and the coordinator on a free loopback port; it sees
`devices_per_process` CPU devices, and cross-process collectives go through
gloo (JAX's CPU collectives). Output lines are prefixed with the process
index. SIGTERM or Ctrl-C here is passed on to every process (a pre-emption:
they save one common step and stop). If a process fails, the others are
stopped within `--kill_timeout` seconds and the launcher exits non-zero,
naming the process, as a cluster scheduler would end the job.

`--env=slurm` describes the job through SLURM's variables instead of
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, which
rehearses JAX's automatic SLURM discovery.

This module imports no JAX: it only starts and watches processes.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# The port JAX derives from a SLURM job id: id % 4096 + this.
_SLURM_PORT_BASE = 65535 - 2**12 + 1
_POLL_SECONDS = 0.1


def _port_is_free(port: int) -> bool:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    try:
      probe.bind(("127.0.0.1", port))
    except OSError:
      return False
  return True


def free_port() -> int:
  """A loopback port nobody listens on now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def _free_slurm_job_id() -> int:
  for _ in range(100):
    job_id = random.randrange(2**12, 2**20)
    if _port_is_free(job_id % 2**12 + _SLURM_PORT_BASE):
      return job_id
  raise RuntimeError("no free port in SLURM's coordinator range")


def _with_device_count(xla_flags: str, count: int) -> str:
  kept = [f for f in xla_flags.split() if not f.startswith(_DEVICE_COUNT_FLAG)]
  return " ".join(kept + [f"{_DEVICE_COUNT_FLAG}={count}"])


def process_environments(num_processes: int, devices_per_process: int, *,
                         style: str = "jax", port: int | None = None,
                         base: dict[str, str] | None = None
                         ) -> list[dict[str, str]]:
  """The environment of each process: its identity, the coordinator, its
  CPU devices. Any device count or job description inherited from `base`
  (default: this process's environment) is replaced."""
  base = dict(os.environ if base is None else base)
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
               "JAX_COORDINATOR_BIND_ADDRESS", "JAX_LOCAL_DEVICE_IDS"):
    base.pop(name, None)
  for name in list(base):
    if name.startswith(("SLURM_", "OMPI_", "PMI_")):
      base.pop(name)  # A launch from inside a job must not look like the job.
  base.update(
      JAX_PLATFORMS="cpu",
      JAX_NUM_CPU_DEVICES=str(devices_per_process),
      XLA_FLAGS=_with_device_count(base.get("XLA_FLAGS", ""), devices_per_process),
      LDM_JAX_DISTRIBUTED="1",
      PYTHONUNBUFFERED="1",
  )
  if style == "slurm":
    job_id = _free_slurm_job_id()
    port = job_id % 2**12 + _SLURM_PORT_BASE
  elif style == "jax":
    port = port or free_port()
  else:
    raise ValueError(f"unknown --env style {style!r}; expected 'jax' or 'slurm'")
  # Only loopback: a rehearsal must not open a port to the network.
  base["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"
  environments = []
  for index in range(num_processes):
    env = dict(base)
    if style == "jax":
      env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(index))
    else:
      env.update(SLURM_JOB_ID=str(job_id), SLURM_STEP_NODELIST="localhost",
                 SLURM_NTASKS=str(num_processes), SLURM_PROCID=str(index),
                 SLURM_LOCALID=str(index), SLURM_STEP_NUM_NODES="1")
    environments.append(env)
  return environments


def _describe(returncode: int) -> str:
  if returncode < 0:
    try:
      return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
      return f"killed by signal {-returncode}"
  return f"exit code {returncode}"


class _Job:
  """The processes of one launch and what the launcher has done to them."""

  def __init__(self, command: Sequence[str], environments: list[dict[str, str]],
               output, prefix_output: bool = True):
    self._output = output
    self._lock = threading.Lock()
    self.processes = []
    self._readers = []
    for index, env in enumerate(environments):
      try:
        process = subprocess.Popen(
            list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
      except OSError:
        self.kill_all()  # Those already started would wait forever for this one.
        raise
      self.processes.append(process)
      reader = threading.Thread(
          target=self._copy_output, args=(index, process.stdout, prefix_output),
          daemon=True)
      reader.start()
      self._readers.append(reader)
    self.say(f"started {len(self.processes)} processes: " + ", ".join(
        f"{i}=pid {p.pid}" for i, p in enumerate(self.processes)))

  def say(self, message: str) -> None:
    with self._lock:
      self._output.write(f"[launch] {message}\n")
      self._output.flush()

  def _copy_output(self, index: int, stream, prefix: bool) -> None:
    for raw in iter(stream.readline, b""):
      line = raw.decode(errors="replace")
      with self._lock:
        self._output.write(f"[{index}] {line}" if prefix else line)
        if not line.endswith("\n"):
          self._output.write("\n")
        self._output.flush()
    stream.close()

  def running(self) -> list[int]:
    return [i for i, p in enumerate(self.processes) if p.poll() is None]

  def signal_all(self, signum: int) -> None:
    for index in self.running():
      try:
        self.processes[index].send_signal(signum)
      except ProcessLookupError:
        pass

  def kill_all(self) -> None:
    # The whole process group: also data-loader workers a process started.
    for process in self.processes:
      try:
        os.killpg(process.pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass

  def finish_output(self) -> None:
    for reader in self._readers:
      reader.join(timeout=5)


def launch(command: Sequence[str], num_processes: int, devices_per_process: int = 1, *,
           style: str = "jax", kill_timeout: float = 10.0, output=None) -> int:
  """Runs `command` as `num_processes` JAX processes; returns the exit status
  (0 when every process succeeded, else that of the first one to fail)."""
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError("--num_processes and --devices_per_process must be >= 1")
  if not command:
    raise ValueError("no command to run; put it after `--`")
  output = output or sys.stdout
  job = _Job(command, process_environments(num_processes, devices_per_process, style=style),
             output)
  stop_requests = []

  def on_signal(signum, frame):
    del frame
    stop_requests.append(signum)

  previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
  first_failure: tuple[int, int] | None = None  # (process, returncode)
  kill_at = None
  forwarded = 0
  try:
    while job.running():
      while forwarded < len(stop_requests):
        forwarded += 1
        if forwarded == 1:
          job.say(f"{signal.Signals(stop_requests[0]).name}: passing SIGTERM to every "
                  "process (they save a checkpoint and stop); signal again to kill them")
          job.signal_all(signal.SIGTERM)
        else:
          job.say("second stop request: killing every process")
          job.kill_all()
      if first_failure is None:
        for index, process in enumerate(job.processes):
          code = process.poll()
          if code is not None and code != 0:
            first_failure = (index, code)
            others = job.running()
            job.say(f"ERROR: process {index} failed ({_describe(code)}); stopping "
                    f"processes {others} (killed if still running in {kill_timeout:g} s)")
            job.signal_all(signal.SIGTERM)
            kill_at = time.monotonic() + kill_timeout
            break
      if kill_at is not None and time.monotonic() >= kill_at and job.running():
        job.say(f"processes {job.running()} still running {kill_timeout:g} s after the "
                "failure: killing them")
        job.kill_all()
        kill_at = None
      time.sleep(_POLL_SECONDS)
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
    if job.running():  # Only on an exception here: leave nothing behind.
      job.kill_all()
    for process in job.processes:
      process.wait()
    job.finish_output()

  codes = [p.returncode for p in job.processes]
  if first_failure is None and any(codes):
    first_failure = next((i, c) for i, c in enumerate(codes) if c)
  if first_failure is None:
    job.say(f"all {num_processes} processes finished")
    return 0
  index, code = first_failure
  job.say(f"FAILED: process {index} {_describe(code)}; exit statuses "
          + ", ".join(f"{i}: {_describe(c)}" for i, c in enumerate(codes)))
  return code if code > 0 else 128 - code


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" in argv:
    split = argv.index("--")
    argv, command = argv[:split], argv[split + 1:]
  else:
    command = []
  parser = argparse.ArgumentParser(
      prog="python -m ldm_jax.launch",
      description="Run a command as N JAX processes on this machine (CPU devices).",
      epilog="The command goes after `--`.")
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("--env", choices=("jax", "slurm"), default="jax",
                      help="describe the job with JAX_* variables, or SLURM_* ones "
                           "(rehearses JAX's SLURM discovery)")
  parser.add_argument("--kill_timeout", type=float, default=10.0,
                      help="seconds the other processes get to stop after one fails")
  args = parser.parse_args(argv)
  if not command:
    parser.error("no command: put it after `--`, e.g. -- python train.py ...")
  try:
    return launch(command, args.num_processes, args.devices_per_process,
                  style=args.env, kill_timeout=args.kill_timeout)
  except OSError as error:
    print(f"[launch] cannot start {command[0]!r}: {error}", file=sys.stderr)
    return 127


if __name__ == "__main__":
  sys.exit(main())
