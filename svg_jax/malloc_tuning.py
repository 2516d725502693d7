"""glibc malloc settings that let a JAX CPU process (and the data loader) reuse freed memory.

XLA:CPU allocates each execution's temporary buffers as one block (884 MB for the calibration
model's bf16 train step) from a worker thread's malloc arena, where glibc serves blocks that large
with a fresh mmap and unmaps them on free. Every step then page-faults all of it in again: 222k
faults and a quarter of the step's time (bench/train_step.py). The loader's 0.6 MB records and
12 MB batches meet the same fate at smaller scale (~2000 faults a batch, a third of its
throughput, bench/loader.py). With one arena, no mmap and a 2 GiB trim threshold, freed blocks
stay in the heap and the next step reuses them.

Call `tune()` before JAX creates its CPU client (its threads keep the arena they started with);
the launch scripts and the test session do it first thing. It is process-wide, and one arena has
costs of its own: torch's bf16 CPU step ~30% slower (its threads then share one arena, so
benchmarks run torch in a process of its own, bench/harness.py) and XLA compiles ~25% slower.
Freed memory stays mapped up to the 2 GiB trim threshold. `python bench/malloc_settings.py`
measures the demo DiT's step: 1.17x / 1.33x faster at batch 16 / 32 (0.4 / 0.9 GiB of
temporaries; no faults on most steps, though the one heap can still grow by a temporary when
small allocations have split the freed block), but at batch 64 (2.1 GiB, past the threshold) glibc
trims and faults as before, and the step is 0.94x with 1.6x the memory. Disabling the trim (-1)
made that step 1.5x faster but let the heap grow to 2.3x the default's memory (7x on a synthetic
kernel); a 2 GiB top pad made it slower; so the bounded threshold stays.

Where JAX will run on an accelerator its temporaries live there, and nothing here was measured to
help; the one GPU run made with these settings prepared the demo 3x slower than an earlier one
without them (unattributed). So `tune()` applies them only when the CPU is JAX's backend: no
`JAX_PLATFORMS` naming another first, no accelerator plugin installed (jax_plugins), and no
libtpu where TPU chips are attached.
SVG_JAX_DEFAULT_MALLOC=1 keeps glibc's defaults always, =0 tunes always; elsewhere than glibc this
is a no-op.
"""
from __future__ import annotations

import ctypes
import glob
import importlib.metadata
import importlib.util
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


def accelerator_expected(environ=os.environ) -> str | None:
  """What makes JAX's default backend something other than the CPU in this process, or None."""
  platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:  # the first one listed is the default backend
    first = platforms.split(",")[0].strip()
    return None if first == "cpu" else f"JAX_PLATFORMS={platforms}"
  plugins = sorted(e.name for e in importlib.metadata.entry_points(group="jax_plugins"))
  if plugins:
    return "jax plugins " + ", ".join(plugins)
  if importlib.util.find_spec("jax_plugins") is not None:
    return "module jax_plugins"
  # libtpu also serves XLA:TPU compiles on CPU-only hosts (launch/aot_compile.py, the tests), so
  # it counts only where TPU chips are attached: /dev/accel* (v2-v4) or /dev/vfio (v5e and later).
  if importlib.util.find_spec("libtpu") is not None and tpu_chips_attached():
    return "module libtpu with TPU chips attached"
  return None


def tpu_chips_attached() -> bool:
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _apply() -> bool:
  choice = os.environ.get(OPT_OUT, "")
  if choice not in ("", "0") or os.uname().sysname != "Linux":
    return False
  if choice == "" and accelerator_expected() is not None:
    return False
  mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
  return mallopt is not None and all(mallopt(param, value) == 1 for param, value in SETTINGS)
