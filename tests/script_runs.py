"""A launch script run as a user runs it, and the lines of its stderr that a user reads: the log
lines of absl, JAX and XLA's plugins (glog's format, and absl's note before the first of them)
and the progress lines (svg_jax/utils/progress.py), which a run prints whatever happens, are left
out."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LOG_LINE = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [^ ]+:\d+\] |"
                       r"WARNING: All log messages before absl::InitializeLog\(\) is called|"
                       r"\[[#.]+\] \d+/\d+ ")


# The suite's programs are tiny and run a few times each, so compiling them is most of its CPU
# time; LLVM's optimizations off cuts that by about a third (docs/design_notes.md).
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS of a test process: `devices` CPU devices (None: XLA's one) and fast compiles."""
  count = f"--xla_force_host_platform_device_count={devices} " if devices else ""
  return count + FAST_COMPILE


def run(script: str, *args, devices: int = 1, timeout: int = 300,
        env: dict | None = None) -> subprocess.CompletedProcess:
  """`python launch/<script> args` on `devices` CPU devices, from the repository root, with
  `env`'s variables added to this process's."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(devices), **(env or {}))
  return subprocess.run([sys.executable, os.path.join(REPO, "launch", script), *map(str, args)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
  """The non-blank lines of `stderr` that are not log lines."""
  return [line for line in stderr.splitlines() if line.strip() and not _LOG_LINE.match(line)]


def assert_one_line(out: subprocess.CompletedProcess, *fragments: str, status: int = 2) -> str:
  """The run exited with `status` after printing one line (besides logs) holding `fragments`."""
  lines = error_lines(out.stderr)
  assert out.returncode == status and len(lines) == 1, (out.returncode, out.stderr[-3000:])
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])
  return lines[0]
