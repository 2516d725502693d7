"""Ends a run whose steps stopped: every thread's stack in the log, one line, exit 7.

A host that waits in a collective for a peer that is alive but stuck waits for ever: JAX's
heartbeat stops a run only when a process is gone, and collectives have no timeout of their own.
When no step ends for `train.stall_timeout_s`, the watch prints every thread's Python stack (the
main thread's names the line it waits on: a step's result, the stop agreement, a checkpoint
barrier, the loader) and ends the process as a failed host does (`process_exit`): the other hosts
are stopped by JAX's coordination service, and a launcher that restarts failed jobs resumes the
run from its newest checkpoint. The watch starts at the first step's end, so the compile and
the restore before it are not timed; the time between two steps includes the checkpoint saves
and the validation that come between them.
"""
from __future__ import annotations

import faulthandler
import sys
import threading
import time
from typing import Callable

from svg_jax import process_exit

EXIT_STALLED = 7


def _stack_and_exit(line: str) -> None:
  faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
  print(line, file=sys.stderr)
  process_exit.exit_process(EXIT_STALLED, line, now=True)


class StallWatch:
  """`beat(step)` after each step; when `timeout_s` (> 0) passes without one, `on_stall(line)`
  runs in the watch's thread (by default: the stacks, the line, exit 7). `stop()` ends the watch."""

  def __init__(self, timeout_s: float, where: str,
               on_stall: Callable[[str], None] = _stack_and_exit):
    self.timeout_s = float(timeout_s)
    self._where = where
    self._on_stall = on_stall
    self._last: tuple[int, float] | None = None
    self._stopped = threading.Event()
    self._thread: threading.Thread | None = None

  def beat(self, step: int) -> None:
    self._last = (step, time.monotonic())
    if self._thread is None and self.timeout_s > 0:
      self._thread = threading.Thread(target=self._watch, name="stall-watch", daemon=True)
      self._thread.start()

  def stop(self) -> None:
    self._stopped.set()

  def _watch(self) -> None:
    while True:
      step, at = self._last
      left = at + self.timeout_s - time.monotonic()
      if left <= 0:
        break
      if self._stopped.wait(left):
        return
    self._on_stall(f"stalled: no step ended for {self.timeout_s:g} s after step {step} "
                   f"(train.stall_timeout_s); every thread's stack is above. Rerun the same "
                   f"command to resume from the newest checkpoint in {self._where}")
