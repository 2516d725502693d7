"""The shared start of the command-line scripts (launch/, research/, bench/ where they run JAX).

`run(main)` is absl's `app.run` with the process set up first: the glibc malloc settings of
`malloc_tuning` must be in place before JAX starts its CPU threads, and the persistent compilation
cache (`compile_cache`) is read from the environment when JAX is imported, so scripts import JAX
inside `main` (or after this), never at module level.
"""
from __future__ import annotations

from typing import Callable

from absl import app

from svg_jax import compile_cache, malloc_tuning


def run(main: Callable, **kwargs) -> None:
  def tuned_main(argv):
    malloc_tuning.tune()
    compile_cache.enable_default()
    return main(argv)

  app.run(tuned_main, **kwargs)
