"""The scripts' persistent compilation cache (svg_jax/compile_cache.py), checked through JAX's own
cache: a script's compile leaves an entry in the default folder, the environment's choice wins,
a folder that cannot be written leaves the cache off instead of failing, and the default folder
is bounded: JAX evicts its least recently used entries past the limit."""
import os
import subprocess
import sys

from svg_jax import compile_cache

# A script's start: cli.run's setup, then a compile JAX keeps (threshold 0 s: every program).
_SCRIPT = """
import sys
import jax  # a config file may import JAX before the setup runs
from svg_jax import compile_cache
print("folder", compile_cache.enable_default())
print("max_size", jax.config.jax_compilation_cache_max_size)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
first, count = int(sys.argv[2]), int(sys.argv[1])
for n in range(first, first + count):  # distinct programs, one entry each: jit_program<n>-...
  program = lambda x, n=n: x * 2 + n
  program.__name__ = f"program{n}"
  jax.jit(program)(jax.numpy.ones(3 + n)).block_until_ready()
"""


def _run(home, programs=1, first=0, **env):
  """(folder in use, JAX's cache size limit, stderr) of a script started with `env`."""
  base = {k: v for k, v in os.environ.items()
          if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE")}
  out = subprocess.run([sys.executable, "-c", _SCRIPT, str(programs), str(first)],
                       env=dict(base, HOME=str(home), **env),
                       capture_output=True, text=True, timeout=120, check=True)
  folder = out.stdout.split("folder ")[-1].split()[0]
  return folder, int(out.stdout.split("max_size ")[-1].split()[0]), out.stderr


def _entries(folder):
  return [n for n in os.listdir(folder) if n.startswith("jit_")] if os.path.isdir(folder) else []


def test_a_script_compile_lands_in_the_default_folder_even_after_jax_was_imported(tmp_path):
  folder, _, _ = _run(tmp_path)
  assert folder == str(tmp_path / ".cache" / "svg_jax" / "jax")
  assert _entries(folder), "JAX wrote no cache entry"


def test_the_environment_chooses_the_folder_or_turns_the_cache_off(tmp_path):
  chosen = tmp_path / "shared_cache"
  folder, _, _ = _run(tmp_path, JAX_COMPILATION_CACHE_DIR=str(chosen))
  assert folder == str(chosen) and _entries(chosen)
  folder, _, _ = _run(tmp_path, JAX_COMPILATION_CACHE_DIR="")
  assert folder == "None" and not (tmp_path / ".cache").exists()


def test_an_unwritable_folder_leaves_the_cache_off_with_a_warning(tmp_path):
  (tmp_path / ".cache").write_text("a file where the folder should be")
  folder, _, err = _run(tmp_path)
  assert folder == "None"
  assert "compilation cache off" in err and "cannot be written" in err


def _entry_files(folder):
  """The cache's entries (with a size limit JAX keeps an access-time file beside each)."""
  return [n for n in os.listdir(folder) if n.startswith("jit_") and not n.endswith("-atime")]


def _programs(folder):
  """The numbers n of the programs whose entries are in the cache, ascending."""
  return sorted(int(n.split("-")[0][len("jit_program"):]) for n in _entry_files(folder)
                if n.startswith("jit_program"))


def test_the_default_folder_is_bounded_and_the_oldest_entries_go(tmp_path):
  assert _run(tmp_path, programs=0)[1] == compile_cache.DEFAULT_MAX_BYTES
  # A folder the user names keeps JAX's default: no limit.
  assert _run(tmp_path, programs=0, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "mine"))[1] == -1
  # Programs 0-1 written without a limit (no access times: the start stamps their mtimes), then
  # programs 2-7 under a limit of 2.5 entries: JAX evicts the least recently used, so what is
  # left are the newest programs.
  folder = tmp_path / ".cache" / "svg_jax" / "jax"
  _run(tmp_path, programs=2, JAX_COMPILATION_CACHE_DIR=str(folder))
  assert _programs(folder) == [0, 1]
  limit = int(2.5 * max(os.path.getsize(folder / n) for n in _entry_files(folder)))
  _run(tmp_path, programs=6, first=2, JAX_COMPILATION_CACHE_MAX_SIZE=str(limit))
  assert sum(os.path.getsize(folder / n) for n in _entry_files(folder)) <= limit
  kept = _programs(folder)
  assert 0 < len(kept) < 6 and kept == list(range(8 - len(kept), 8)), kept


def test_entries_written_without_a_limit_do_not_stop_the_bounded_cache(tmp_path):
  """An entry that a process without the size limit left in the default folder has no
  access-time file; JAX's bounded cache would fail every later write on it (a warning, nothing
  cached). The scripts' start gives it one."""
  folder = tmp_path / ".cache" / "svg_jax" / "jax"
  _run(tmp_path, JAX_COMPILATION_CACHE_DIR=str(folder))  # no limit: no access-time file
  old = _entry_files(folder)
  assert old and not [n for n in os.listdir(folder) if n.endswith("-atime")]
  _, _, err = _run(tmp_path, programs=2, first=1)  # programs of its own: no cache hit stamps one
  assert "Error writing persistent compilation cache" not in err, err[-2000:]
  assert len(_entry_files(folder)) > len(old)
