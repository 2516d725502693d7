"""glibc malloc settings that let the loader reuse its large buffers instead of faulting them in.

A 2B stage-1 record is ~0.6 MB and a batch ~12 MB, allocated in Grain's read threads and freed in
the consumer. Under glibc's default (dynamic) thresholds part of that memory goes back to the OS
after every batch and is page-faulted in again on the next: ~1500 faults and 6 MB of page zeroing
per batch, 13% of the loader's CPU under `perf` and a third of its throughput (bench/loader.py).
Fixing the mmap threshold at glibc's maximum and raising the trim threshold keeps freed memory in
the process for reuse. The cost is that up to `TRIM_THRESHOLD` of free memory per malloc arena
stays mapped, which accelerator hosts can afford. Elsewhere than glibc this is a no-op.
"""
from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value (on 64-bit)
TRIM_THRESHOLD = 256 << 20

_tuned_in_pid: int | None = None


def reuse_freed_memory() -> bool:
  """Applies the settings to this process once (Grain workers call it again); True if applied."""
  global _tuned_in_pid
  if _tuned_in_pid == os.getpid():
    return True
  mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
  if mallopt is None or os.uname().sysname != "Linux":
    return False
  ok = (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
  if ok:
    _tuned_in_pid = os.getpid()
  return ok
