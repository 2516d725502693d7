"""The shared start of the command-line scripts (launch/, research/, bench/ where they run JAX).

`run(main)` is absl's `app.run` with the process set up first: the glibc malloc settings of
`malloc_tuning` must be in place before JAX starts its CPU threads, and the persistent compilation
cache (`compile_cache`) is read from the environment when JAX is imported, so scripts import JAX
inside `main` (or after this), never at module level. On a GPU, XLA's allocator may take
`GPU_MEMORY_FRACTION` of the card instead of its default 75% (the environment's
XLA_PYTHON_CLIENT_MEM_FRACTION wins): the 2.6B stage-1 step at 32 samples takes 55 GiB with full
rematerialization and 62 GiB saving q, k, v and the attention output, over 75% of an 80 GB H100
less remat auto's headroom (docs/performance.md, "The step compiled for a Hopper GPU").

`kill -USR1 <pid>` makes a running script print every thread's Python stack to its stderr and go
on: where a host of a stuck pod run waits (a step's collective, a checkpoint barrier, the loader).
A thread of its own prints them, woken by the byte that Python's C-level signal handler writes to
its wakeup file descriptor in whichever thread the signal reaches. So the stacks also come while
the main thread is blocked inside XLA, where a Python handler would wait for it to return, and
whatever thread the kernel picks (one started before the script's start, as OpenBLAS's threads
are, would not block a signal that the others block). The thread prints holding the interpreter's
lock: `faulthandler.register` prints from inside the signal handler, walking the threads without
the lock, and crashed processes (SIGSEGV) when a thread ended during the walk.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
from typing import Callable

from absl import app

from svg_jax import compile_cache, malloc_tuning

# The rest of the card holds the CUDA context, cuDNN's workspaces and NCCL's buffers.
GPU_MEMORY_FRACTION = "0.92"
STACKS_SIGNAL = signal.SIGUSR1


def print_stacks_on_signal() -> None:
  """Every thread's stack to stderr on STACKS_SIGNAL, unless a handler of its own is installed.
  Call it from the main thread; it takes Python's signal wakeup file descriptor, unless another
  is set (then the main thread prints, when it next runs Python)."""
  if signal.getsignal(STACKS_SIGNAL) != signal.SIG_DFL:  # the default would end the process
    return
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)  # a flood of signals drops bytes instead of blocking
  previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
  if previous != -1:  # not ours to take: give it back
    signal.set_wakeup_fd(previous)
    os.close(read_fd)
    os.close(write_fd)
    signal.signal(STACKS_SIGNAL, lambda *_: _print_stacks())
    return
  signal.signal(STACKS_SIGNAL, lambda *_: None)  # the signal reaches the descriptor
  threading.Thread(target=_print_stacks_on_each_signal, args=(read_fd,), name="stacks-on-signal",
                   daemon=True).start()


def _print_stacks() -> None:
  faulthandler.dump_traceback(file=sys.stderr, all_threads=True)


def _print_stacks_on_each_signal(read_fd: int) -> None:
  while True:
    if STACKS_SIGNAL in os.read(read_fd, 512):  # signal numbers, one byte each
      _print_stacks()


def run(main: Callable, **kwargs) -> None:
  def tuned_main(argv):
    malloc_tuning.tune()
    print_stacks_on_signal()
    compile_cache.enable_default()
    # Read when the GPU backend starts (the first device query), not when JAX is imported.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION)
    return main(argv)

  app.run(tuned_main, **kwargs)
