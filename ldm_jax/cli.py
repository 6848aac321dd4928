"""How every command line of ldm-jax fails: one clear message, a non-zero
exit status, and no traceback.

  if __name__ == "__main__":
    cli.run(main)            # absl programs: train.py, sample.py, ldm_jax.data
    sys.exit(cli.guard(main))  # anything else: python -m ldm_jax.fid

A traceback is the right report for a bug, not for a mistyped flag, a missing
file or a diverged run, so the wrappers print `error: <message>` on stderr and
exit with status 2. `--debug` (or the environment variable LDM_JAX_DEBUG=1)
lets the exception through, traceback and all.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

DEBUG_ENV = "LDM_JAX_DEBUG"
DEBUG_FLAG = "--debug"
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
# A message longer than this is a library's dump, not an explanation.
_MAX_LINES = 12
_MAX_LINE_CHARS = 600

# Exceptions that report a problem with the input or the environment; their
# message is the whole story. Anything else is reported with its type and a
# pointer to the traceback, since it most likely is a bug.
_USER_ERRORS = (ValueError, OSError, FloatingPointError, ImportError)


def debug_requested(argv: Sequence[str]) -> bool:
  """Whether the user asked for tracebacks: `--debug` or LDM_JAX_DEBUG=1."""
  if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes"):
    return True
  return any(arg == DEBUG_FLAG or arg in (f"{DEBUG_FLAG}=true", f"{DEBUG_FLAG}=1")
             for arg in argv[1:])


def _unwrap(error: BaseException) -> BaseException:
  """The exception that carries the message, through wrappers that only
  re-raise another exception as their argument (ml_collections does this)."""
  seen = set()
  while (len(error.args) == 1 and isinstance(error.args[0], BaseException)
         and id(error) not in seen):
    seen.add(id(error))
    error = error.args[0]
  return error


def _config_key_message(text: str, argv: Sequence[str]) -> str | None:
  """ml_collections' "'key'\\nDid you mean ...?" as one readable line, naming
  the command-line override it came from."""
  match = re.fullmatch(r"'([^'\n]+)'(?:\n(.*))?", text, flags=re.S)
  if not match:
    return None
  key, hint = match.group(1), (match.group(2) or "").strip()
  overrides = [arg.split("=", 1)[0] for arg in argv[1:]
               if re.match(rf"--config\.(?:[\w.]+\.)?{re.escape(key)}(?:=|$)", arg)]
  where = f" in {overrides[0]}" if overrides else ""
  return f"unknown config key {key!r}{where}" + (f"; {hint}" if hint else "")


def _config_file_message(text: str) -> str | None:
  """config_flags' multi-line "could not load the config file" report as one line."""
  prefix = "Configuration is not available because of an earlier failure to load:"
  if not text.startswith(prefix):
    return None
  details = [line.strip() for line in text.splitlines()[1:] if line.strip()]
  attempted = [line for line in details if not line.startswith(("Attempted", "["))]
  causes = [line for line in details if line.startswith("[")]
  path = attempted[0] if attempted else "?"
  return f"could not load --config={path}" + (f": {causes[-1]}" if causes else "")


def describe(error: BaseException, argv: Sequence[str] = ()) -> str:
  """The message of `error`, made readable: no repr-escaped text, at most a
  few lines, and the type named when it is not an input problem."""
  inner = _unwrap(error)
  if isinstance(inner, KeyError) and len(inner.args) == 1 and isinstance(inner.args[0], str):
    text = inner.args[0]  # str(KeyError) would repr-escape it.
  else:
    text = str(inner)
  readable = _config_key_message(text, argv) or _config_file_message(text)
  text = (readable or text).strip()
  lines = [line[:_MAX_LINE_CHARS] for line in text.splitlines()] or [type(inner).__name__]
  if len(lines) > _MAX_LINES:
    lines = lines[:_MAX_LINES] + [f"... ({len(lines) - _MAX_LINES} more lines; "
                                  f"{DEBUG_ENV}=1 shows everything)"]
  message = "\n".join(lines)
  if readable is None and not isinstance(error, _USER_ERRORS) and not isinstance(
      inner, _USER_ERRORS):
    message = (f"{type(inner).__name__}: {message}\n(unexpected; rerun with "
               f"{DEBUG_ENV}=1 for the traceback)")
  return message


def report(error: BaseException, argv: Sequence[str] = ()) -> None:
  print(f"error: {describe(error, argv)}", file=sys.stderr, flush=True)


def guard(function: Callable[..., Any], *args: Any, argv: Sequence[str] | None = None) -> Any:
  """Calls `function(*args)`; on an exception, reports it and returns
  EXIT_ERROR (or re-raises it when debugging was asked for)."""
  argv = list(sys.argv if argv is None else argv)
  try:
    return function(*args)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED
  except Exception as error:  # pylint: disable=broad-except
    if debug_requested(argv):
      raise
    report(error, argv)
    return EXIT_ERROR


def run(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
  """`absl.app.run(main)`, with errors reported as above; never returns.

  The program first re-executes itself with glibc's huge-page tunable where
  that helps (`huge_pages`: 1.2-1.3x faster CPU steps).
  """
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ldm_jax import huge_pages  # pylint: disable=g-import-not-at-top
  huge_pages.reexec_with_huge_pages()
  argv = list(sys.argv if argv is None else argv)
  if "debug" not in flags.FLAGS:
    flags.DEFINE_bool("debug", False,
                      f"Show the traceback of an error (also: {DEBUG_ENV}=1).")
  status = guard(app.run, main, argv, argv=argv)
  sys.exit(status)


def require_directory(flag: str, path: str | None) -> None:
  """Refuses a path flag that names an existing regular file where a
  directory (new or existing) is expected, before any work is done."""
  if path and os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(f"{flag} {path} is a file, not a directory")
