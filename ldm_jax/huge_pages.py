"""Transparent huge pages for glibc's large allocations, for the command lines.

XLA:CPU allocates the temporaries of each compiled call as one buffer
(about 1.7 GB for issue 8's UNet train step) and frees it when the call
returns. glibc serves a request that large with a fresh `mmap` and returns it
with `munmap`, so every step touches every 4 KiB page of it anew: 550,000
minor page faults and about 1 CPU-second of kernel time per step of that UNet
(bench/README.md, round 13). glibc 2.35 and later can ask the kernel for
transparent huge pages for such mappings (the `glibc.malloc.hugetlb=1`
tunable): 1,300 faults per step, and the steps run 1.2-1.3x faster on a
2-core machine whose kernel leaves huge pages to `madvise`, the default of
Debian and Ubuntu.

Tunables are read once, when a process starts, so a program that wants them
re-executes itself: `reexec_with_huge_pages()` replaces the process (same
PID, same arguments, same environment plus the tunable) before it does any
work. `cli.run` calls it for the absl programs (train.py, sample.py,
`python -m ldm_jax.data`), `python -m ldm_jax.fid` calls it, and the
benchmark scripts call it too, so that they time what users get. Nothing
happens where it cannot help: outside glibc 2.35+, when the kernel's huge
pages are off, when GLIBC_TUNABLES already sets the tunable (either value),
or when LDM_JAX_HUGE_PAGES=0.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

OPT_OUT_ENV = "LDM_JAX_HUGE_PAGES"
TUNABLE = "glibc.malloc.hugetlb"
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
_MIN_GLIBC = (2, 35)  # The release that added glibc.malloc.hugetlb.


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the C library this process runs on, if it is glibc."""
  try:
    name, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")
  except (AttributeError, ValueError, OSError):
    return None
  if name != "glibc":
    return None
  try:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)
  except ValueError:
    return None


def transparent_huge_page_mode(path: str = _THP_MODE_FILE) -> str | None:
  """The kernel's THP mode ('always', 'madvise' or 'never'), None if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether this process started with the tunable on (benchmarks print it)."""
  tunables = environ.get("GLIBC_TUNABLES", "").split(":")
  return f"{TUNABLE}=1" in tunables or f"{TUNABLE}=2" in tunables


def huge_page_environment(environ: Mapping[str, str], glibc: tuple[int, int] | None,
                          thp_mode: str | None) -> dict[str, str] | None:
  """The environment to re-execute with, or None when nothing should change.

  Pure, so that every case is testable: `environ` is the current
  environment, `glibc` the C library's version, `thp_mode` the kernel's.
  """
  if environ.get(OPT_OUT_ENV, "").strip().lower() in ("0", "false", "no", "off"):
    return None
  if glibc is None or glibc < _MIN_GLIBC or thp_mode not in ("always", "madvise"):
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  # Whatever value is there, it is the user's choice (and after our own
  # re-execution it is ours, which is what stops a second one).
  if any(item.split("=", 1)[0] == TUNABLE for item in tunables.split(":")):
    return None
  environment = dict(environ)
  environment["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))
  return environment


def reexec_with_huge_pages() -> None:
  """Re-executes this program with the tunable set, when that can help.

  Returns only when nothing changes; otherwise the process image is replaced
  (os.execve keeps the PID, open files and arguments), so call it before
  any work that should not run twice.
  """
  environment = huge_page_environment(os.environ, glibc_version(),
                                      transparent_huge_page_mode())
  if environment is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  # sys.orig_argv is the interpreter's own command line (`python -m mod ...`
  # included), which sys.argv is not.
  os.execve(sys.executable, list(sys.orig_argv), environment)
