"""glibc malloc settings, checked against the kernel's page-fault counter: with glibc's defaults an
XLA:CPU execution with large temporaries faults all of them in again on every call; tuned, it
reuses them."""
import json
import os
import subprocess
import sys

import pytest

_PROBE = """
import json, resource, sys
from svg_jax import malloc_tuning
applied = malloc_tuning.tune()
import jax, jax.numpy as jnp
# 64 MB of input, and temporaries above glibc's largest mmap threshold (32 MB)
f = jax.jit(lambda x: (jnp.cumsum(jnp.sin(x), axis=0) * jnp.cumsum(jnp.cos(x), axis=1)).sum(0))
x = jnp.ones((4096, 4096), jnp.float32)
faults = []
for _ in range(24):
  start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(json.dumps({"applied": applied, "faults": faults[2:],  # after the first calls' setup
                  "x_bytes": x.nbytes, "page_size": resource.getpagesize()}))
"""


def _probe(opt_out):
  # XLA's default flags, as users run it: the suite's fast compiles (script_runs.xla_flags) run
  # these cumsums several times slower (24 s -> 88 s for the test), and compile time is moot here.
  env = dict(os.environ, SVG_JAX_DEFAULT_MALLOC="1" if opt_out else "0", XLA_FLAGS="")
  # 5-14 s each on 2 busy cores; the timeout stops a hung child long before pytest's limit.
  out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                       env=env, timeout=120)
  return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc settings; a no-op elsewhere")
def test_xla_temporaries_are_reused_instead_of_faulted_in_every_call():
  """With the defaults every call faults its temporaries in again. Tuned, most calls fault
  nothing; on some calls the heap still grows by a temporary's size (a freed block split by small
  allocations no longer fits it: strace shows brk growing, never shrinking), which faults fresh
  pages. That happened on at most 6 of 22 calls in 27 processes."""
  default, tuned = _probe(opt_out=True), _probe(opt_out=False)
  assert not default["applied"] and tuned["applied"]
  # The problem exists: with the defaults every call faults in at least as many bytes as its
  # 64 MB input, since its cumsum temporaries are each that size, above glibc's largest mmap
  # threshold, so mapped afresh on every call (~4x the input measured). In bytes, so that the
  # page size does not matter.
  assert min(default["faults"]) * default["page_size"] >= default["x_bytes"], default
  # A call that reuses its temporaries faults in under 1% of what a default call, measured beside
  # it, does (0 or 1 pages measured, against ~68000).
  reused = sum(n * 100 < min(default["faults"]) for n in tuned["faults"])
  assert reused > len(tuned["faults"]) / 2, (default, tuned)
  assert sum(tuned["faults"]) < 0.4 * sum(default["faults"]), (default, tuned)


def test_the_settings_are_for_jax_on_the_cpu_only(monkeypatch):
  """An accelerator backend keeps glibc's defaults unless SVG_JAX_DEFAULT_MALLOC=0 asks for them:
  JAX_PLATFORMS names the default backend first, and an installed plugin makes one likely."""
  from svg_jax import malloc_tuning

  assert malloc_tuning.accelerator_expected({"JAX_PLATFORMS": "cpu"}) is None
  assert malloc_tuning.accelerator_expected({"JAX_PLATFORMS": "cuda,cpu"}) == "JAX_PLATFORMS=cuda,cpu"
  assert malloc_tuning.accelerator_expected({"JAX_PLATFORMS": " CPU , tpu"}) is None

  class Plugin:
    name = "xla_cuda13"

  monkeypatch.setattr(malloc_tuning.importlib.metadata, "entry_points",
                      lambda group: [Plugin()] if group == "jax_plugins" else [])
  assert malloc_tuning.accelerator_expected({}) == "jax plugins xla_cuda13"
  assert malloc_tuning.accelerator_expected({"JAX_PLATFORMS": "cpu"}) is None
  # libtpu (the test extra installs it for XLA:TPU compiles) counts only beside TPU chips.
  monkeypatch.setattr(malloc_tuning.importlib.metadata, "entry_points", lambda group: [])
  monkeypatch.setattr(malloc_tuning.importlib.util, "find_spec",
                      lambda name: object() if name == "libtpu" else None)
  for chips, expected in ((False, None), (True, "module libtpu with TPU chips attached")):
    monkeypatch.setattr(malloc_tuning, "tpu_chips_attached", lambda: chips)
    assert malloc_tuning.accelerator_expected({}) == expected
  monkeypatch.setattr(malloc_tuning.importlib.metadata, "entry_points",
                      lambda group: [Plugin()] if group == "jax_plugins" else [])
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr(malloc_tuning.ctypes, "CDLL", lambda _: type("libc", (), {
      "mallopt": staticmethod(lambda param, value: 1)})())  # this process keeps its settings
  for choice, applies in (("", False), ("1", False), ("0", True)):
    monkeypatch.setenv("SVG_JAX_DEFAULT_MALLOC", choice)
    assert malloc_tuning._apply() is applies, choice
