"""glibc malloc settings that let a JAX CPU process (and the data loader) reuse freed memory.

XLA:CPU allocates each execution's temporary buffers as one block (884 MB for the calibration
model's bf16 train step) from a worker thread's malloc arena, where glibc serves blocks that large
with a fresh mmap and unmaps them on free. Every step then page-faults all of it in again: 222k
faults and a quarter of the step's time (bench/train_step.py). The loader's 0.6 MB records and
12 MB batches meet the same fate at smaller scale (~2000 faults a batch, a third of its
throughput, bench/loader.py). With one arena, no mmap and a 2 GiB trim threshold, freed blocks
stay in the heap and the next step reuses them.

Call `tune()` before JAX creates its CPU client (its threads keep the arena they started with);
the launch scripts and the test session do it first thing. It is process-wide: it slowed torch's
bf16 CPU step by ~30% (its threads then share one arena), so benchmarks run torch in a process of
its own (bench/harness.py). Freed memory stays mapped (up to the trim threshold). Set
SVG_JAX_DEFAULT_MALLOC=1 to keep glibc's defaults; elsewhere than glibc this is a no-op.
"""
from __future__ import annotations

import ctypes
import os

# mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
OPT_OUT = "SVG_JAX_DEFAULT_MALLOC"

_outcome: tuple[int, bool] | None = None  # (pid, applied): the loader asks on every record


def tune() -> bool:
  """Applies the settings to this process (once; Grain workers call it again). True if applied."""
  global _outcome
  pid = os.getpid()
  if _outcome is None or _outcome[0] != pid:
    _outcome = (pid, _apply())
  return _outcome[1]


def _apply() -> bool:
  if os.environ.get(OPT_OUT, "") not in ("", "0") or os.uname().sysname != "Linux":
    return False
  mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
  return mallopt is not None and all(mallopt(param, value) == 1 for param, value in SETTINGS)
