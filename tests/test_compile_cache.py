"""The scripts' persistent compilation cache (svg_jax/compile_cache.py), checked through JAX's own
cache: a script's compile leaves an entry in the default folder, the environment's choice wins,
and a folder that cannot be written leaves the cache off instead of failing."""
import os
import subprocess
import sys

# A script's start: cli.run's setup, then a compile JAX keeps (threshold 0 s: every program).
_SCRIPT = """
import sys
import jax  # a config file may import JAX before the setup runs
from svg_jax import compile_cache
print("folder", compile_cache.enable_default())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: x * 2 + 1)(jax.numpy.ones(3)).block_until_ready()
"""


def _run(home, **env):
  base = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  out = subprocess.run([sys.executable, "-c", _SCRIPT], env=dict(base, HOME=str(home), **env),
                       capture_output=True, text=True, timeout=120, check=True)
  return out.stdout.split("folder ")[-1].split()[0], out.stderr


def _entries(folder):
  return [n for n in os.listdir(folder) if n.startswith("jit_")] if os.path.isdir(folder) else []


def test_a_script_compile_lands_in_the_default_folder_even_after_jax_was_imported(tmp_path):
  folder, _ = _run(tmp_path)
  assert folder == str(tmp_path / ".cache" / "svg_jax" / "jax")
  assert _entries(folder), "JAX wrote no cache entry"


def test_the_environment_chooses_the_folder_or_turns_the_cache_off(tmp_path):
  chosen = tmp_path / "shared_cache"
  folder, _ = _run(tmp_path, JAX_COMPILATION_CACHE_DIR=str(chosen))
  assert folder == str(chosen) and _entries(chosen)
  folder, _ = _run(tmp_path, JAX_COMPILATION_CACHE_DIR="")
  assert folder == "None" and not (tmp_path / ".cache").exists()


def test_an_unwritable_folder_leaves_the_cache_off_with_a_warning(tmp_path):
  (tmp_path / ".cache").write_text("a file where the folder should be")
  folder, err = _run(tmp_path)
  assert folder == "None"
  assert "compilation cache off" in err and "cannot be written" in err
