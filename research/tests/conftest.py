"""Test session setup of tests/conftest.py, for when research/tests runs alone: 8 fake CPU devices
and fp32 matmuls. As a package under the repo root, this folder's tests import `research` from
there (pytest puts the first folder above without an __init__.py on sys.path)."""
import os

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from svg_jax import malloc_tuning  # noqa: E402

malloc_tuning.tune()  # before JAX starts its CPU threads: XLA's temporaries are then reused

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
