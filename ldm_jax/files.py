"""Writing files so that a crash never leaves half of one."""

from __future__ import annotations

import contextlib
import os
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
  """Opens a temporary file beside `path` and renames it onto `path` once the
  block has written it: readers, and a rerun after a kill mid-write, see the
  old file or the new one, never part of one. If the block raises, `path` is
  left as it was and the temporary file is removed."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # The process id keeps two writers of one path (two processes of a job)
  # from writing into each other's temporary file.
  partial = f"{path}.partial-{os.getpid()}"
  try:
    with open(partial, mode) as f:
      yield f
      f.flush()
      # Renamed only once the bytes are on disk: otherwise a power cut could
      # leave a renamed but empty file.
      os.fsync(f.fileno())
    os.replace(partial, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(partial)
    raise
