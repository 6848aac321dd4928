"""The command lines' re-execution with glibc's huge-page tunable."""

import os
import subprocess
import sys
import textwrap

import pytest

from ldm_jax import huge_pages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ON = "glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("glibc, thp", [((2, 36), "madvise"), ((2, 35), "always"),
                                        ((3, 0), "madvise")])
def test_sets_the_tunable_where_it_can_help(glibc, thp):
  environment = huge_pages.huge_page_environment({"HOME": "/h"}, glibc, thp)
  assert environment == {"HOME": "/h", "GLIBC_TUNABLES": ON}


def test_keeps_the_users_other_tunables_and_leaves_the_input_alone():
  before = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
  environment = huge_pages.huge_page_environment(before, (2, 36), "madvise")
  assert environment["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{ON}"
  assert before == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}


@pytest.mark.parametrize("environ, glibc, thp", [
    ({}, None, "madvise"),                      # Not glibc (musl, macOS).
    ({}, (2, 34), "madvise"),                   # Before the tunable existed.
    ({}, (2, 36), "never"),                     # Huge pages off in the kernel.
    ({}, (2, 36), None),                        # No THP at all (not Linux).
    ({"GLIBC_TUNABLES": ON}, (2, 36), "madvise"),  # Already re-executed.
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "always"),  # The user's "no".
    ({"GLIBC_TUNABLES": f"a.b=1:{ON}"}, (2, 36), "madvise"),
    ({huge_pages.OPT_OUT_ENV: "0"}, (2, 36), "madvise"),
    ({huge_pages.OPT_OUT_ENV: "off"}, (2, 36), "madvise"),
])
def test_changes_nothing_where_it_cannot_help_or_was_not_wanted(environ, glibc, thp):
  assert huge_pages.huge_page_environment(environ, glibc, thp) is None


def test_reads_the_kernels_mode(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert huge_pages.transparent_huge_page_mode(str(path)) == "madvise"
  path.write_text("[always] madvise never\n")
  assert huge_pages.transparent_huge_page_mode(str(path)) == "always"
  path.write_text("garbage\n")
  assert huge_pages.transparent_huge_page_mode(str(path)) is None
  assert huge_pages.transparent_huge_page_mode(str(tmp_path / "missing")) is None


def test_enabled_reads_the_tunable():
  assert huge_pages.enabled({"GLIBC_TUNABLES": f"x.y=3:{ON}"})
  assert not huge_pages.enabled({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
  assert not huge_pages.enabled({})


_PROGRAM = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    from ldm_jax import huge_pages
    print("start", os.getpid(), flush=True)
    huge_pages.reexec_with_huge_pages()
    print("run", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:],
          huge_pages.enabled(), flush=True)
""")


def _run(tmp_path, extra_environment):
  script = tmp_path / "program.py"
  script.write_text(_PROGRAM.format(root=ROOT))
  environment = {k: v for k, v in os.environ.items()
                 if k not in ("GLIBC_TUNABLES", huge_pages.OPT_OUT_ENV)}
  environment.update(extra_environment)
  result = subprocess.run([sys.executable, str(script), "--a=1", "b c"], env=environment,
                          capture_output=True, text=True, timeout=120, check=True)
  return [line.split(" ", 2) for line in result.stdout.splitlines()]


def test_a_program_reexecutes_itself_once_with_the_same_pid_and_arguments(tmp_path):
  lines = _run(tmp_path, {})
  supported = huge_pages.huge_page_environment(
      {}, huge_pages.glibc_version(), huge_pages.transparent_huge_page_mode()) is not None
  starts = [line for line in lines if line[0] == "start"]
  (run,) = [line for line in lines if line[0] == "run"]
  assert len(starts) == (2 if supported else 1)
  assert {start[1] for start in starts} == {run[1].split(" ")[0]}  # One PID throughout.
  assert "['--a=1', 'b c']" in run[2]
  assert (ON in run[2]) == supported
  assert run[2].endswith(str(supported))


def test_the_opt_out_keeps_the_process_as_it_is(tmp_path):
  lines = _run(tmp_path, {huge_pages.OPT_OUT_ENV: "0"})
  assert [line[0] for line in lines] == ["start", "run"]
  assert ON not in lines[1][2]
