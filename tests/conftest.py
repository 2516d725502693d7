"""Test session setup: 8 fake CPU devices (for the sharding tests), fast compiles
(`script_runs.xla_flags`) and fp32 matmuls everywhere."""
import atexit
import os
import shutil
import tempfile

import script_runs  # the test processes' XLA flags (no JAX import)

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", script_runs.xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session and the scripts its tests start (they inherit
# the environment): a program that one test or process compiled loads in the next. The user's
# cache (svg_jax/compile_cache.py) stays untouched; the folder goes at exit.
_XLA_CACHE = tempfile.mkdtemp(prefix="svg_jax_tests_xla_cache_")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE

from svg_jax import malloc_tuning  # noqa: E402

malloc_tuning.tune()  # before JAX starts its CPU threads: XLA's temporaries are then reused

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
