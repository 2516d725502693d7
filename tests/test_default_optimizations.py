"""The suite compiles with LLVM's optimizations off (`script_runs.FAST_COMPILE`); users' runs
compile at XLA's defaults. The forward parity of the four models against transformers and
diffusers runs again here at the defaults, in a pytest process of its own (conftest keeps the
XLA_FLAGS it is given): a miscompile that only the optimizations cause would fail it here."""
import os
import subprocess
import sys

import script_runs

PARITY = ["tests/test_nextdit_parity.py::test_parity_with_diffusers",
          "tests/test_dinov3.py::test_small_parity",
          "tests/test_gemma2.py::test_parity_with_transformers",
          "tests/test_decoder.py::test_parity_with_diffusers"]
# The DiT's cases of both patch sizes, padded and not, scanned and not.
DIT_CASES = "p1_square or p2_nonsquare or p1_no_padding_unscanned or not test_nextdit_parity"


def test_the_models_parity_holds_at_xlas_default_optimizations():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-k", DIT_CASES, *PARITY], env=env, cwd=script_runs.REPO,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:]
  summary = out.stdout.strip().splitlines()[-1]
  assert summary.startswith("12 passed") and "deselected" in summary, summary
