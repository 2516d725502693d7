"""The scripts' shared start (svg_jax/cli.py): XLA's share of a GPU's memory, set before the
backend starts unless the environment chose one."""
import os
import subprocess
import sys

from svg_jax import cli

_SCRIPT = """
import os
from svg_jax import cli
cli.run(lambda argv: print("fraction", os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")))
"""


def _fraction(**env):
  base = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_MEM_FRACTION"}
  out = subprocess.run([sys.executable, "-c", _SCRIPT], env=dict(base, **env),
                       capture_output=True, text=True, timeout=120, check=True)
  return out.stdout.split("fraction ")[-1].split()[0]


def test_scripts_give_xla_most_of_the_gpu_unless_told_otherwise():
  assert _fraction() == cli.GPU_MEMORY_FRACTION == "0.92"
  assert _fraction(XLA_PYTHON_CLIENT_MEM_FRACTION="0.5") == "0.5"
