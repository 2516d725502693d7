"""JAX's persistent compilation cache, on by default for the command-line scripts.

Without it, a run that restarts after a preemption (or a sampler rerun on the same shapes)
compiles its programs again on every host, and the 2.6B train step's compile is long. With it, the
second start loads the executables XLA saved on the first (`python bench/trainer.py --config
configs/tiny.py --steps 5`, run twice: compile 9.2 s, then 2.4 s on 2 CPU cores). On GPUs and
TPUs the step that `model.remat_policy = "auto"` compiled for its choice is loaded by the first
training step of that shape (svg_jax/train/remat.py), so "auto" costs no extra compile for the
policy it picks.

`enable_default()` points `JAX_COMPILATION_CACHE_DIR` at `DEFAULT_DIR` unless the environment
already names one (an empty value turns the cache off); child processes inherit it. JAX reads the
variable when it is imported, and a config file may have imported it already, so the setting is
also applied to a loaded JAX (it takes effect at the first compile). A folder that cannot be
created or written leaves the cache off with a warning rather than failing the run. JAX keys each
entry by the program, the devices, the XLA flags and the jax/jaxlib versions, so a stale entry is
never loaded. The default folder holds at most `DEFAULT_MAX_BYTES` (`JAX_COMPILATION_CACHE_MAX_SIZE`
in bytes overrides it): past that JAX deletes the least recently used entries. A folder the
environment names is the user's and keeps JAX's own default, no limit. Only programs that took at
least a second to compile are kept (JAX's default threshold), and only process 0 of a multi-host
run writes them.
"""
from __future__ import annotations

import os
import sys

ENV = "JAX_COMPILATION_CACHE_DIR"
DEFAULT_DIR = os.path.join("~", ".cache", "svg_jax", "jax")
MAX_SIZE_ENV = "JAX_COMPILATION_CACHE_MAX_SIZE"
# A 2.6B train step's executable is tens to hundreds of MB; this keeps dozens of them.
DEFAULT_MAX_BYTES = 8 * 2 ** 30


def enable_default(directory: str = DEFAULT_DIR) -> str | None:
  """Sets the cache folder for this process and its children unless the environment chose one;
  returns the folder in use (None: off). Call it before the first compile."""
  if ENV in os.environ:
    return os.environ[ENV] or None
  path = os.path.expanduser(directory)
  try:
    os.makedirs(path, exist_ok=True)
    writable = os.access(path, os.W_OK | os.X_OK)
  except OSError:
    writable = False
  if not writable:
    print(f"warning: compilation cache off: {path} cannot be written (set {ENV} to a writable "
          "folder)", file=sys.stderr)
    return None
  os.environ[ENV] = path
  os.environ.setdefault(MAX_SIZE_ENV, str(DEFAULT_MAX_BYTES))
  _stamp_unstamped_entries(path)
  if "jax" in sys.modules:
    config = sys.modules["jax"].config
    config.update("jax_compilation_cache_dir", path)
    config.update("jax_compilation_cache_max_size", int(os.environ[MAX_SIZE_ENV]))
  return path


# JAX's size-bounded cache keeps an access-time file beside each entry.
_ENTRY_SUFFIX, _ACCESS_TIME_SUFFIX = "-cache", "-atime"


def _stamp_unstamped_entries(path: str) -> None:
  """Gives each entry without an access-time file its modification time as one.

  With a size limit, JAX reads the access time of every entry before it writes a new one, and an
  entry without one (written with no limit: a process that named this folder itself, or an
  earlier svg_jax) fails every later write: a warning at each compile and nothing cached."""
  try:
    names = set(os.listdir(path))
    for name in (n for n in names if n.endswith(_ENTRY_SUFFIX)):
      key = name[:-len(_ENTRY_SUFFIX)]
      if key + _ACCESS_TIME_SUFFIX not in names:
        stamp = os.stat(os.path.join(path, name)).st_mtime_ns.to_bytes(8, "little")
        with open(os.path.join(path, key + _ACCESS_TIME_SUFFIX), "wb") as f:
          f.write(stamp)
  except OSError:  # an entry evicted meanwhile; the next start stamps what is left
    pass
