"""Ends a run that stopped moving: every thread's stack in the log, one line, exit 7.

A host that waits in a collective for a peer that is alive but stuck waits for ever: JAX's
heartbeat stops a run only when a process is gone, and collectives have no timeout of their own.
The same holds for a checkpoint restore whose barrier waits for a host stuck reading its shards.
When what the loop waits for (a restore, the hosts' agreement on a config choice, the first
batch, a step) takes longer than `train.stall_timeout_s`, the watch prints every thread's Python
stack (the main thread's names the line it waits on) and ends the process as a failed host does
(`process_exit`): the other hosts are stopped by JAX's coordination service, and a launcher that
restarts failed jobs resumes the run from its newest checkpoint. Before that, the process that
writes metrics.jsonl appends a "stalled" event to it, so that whoever watches the file can tell a
dead run from a slow one.

The loop arms the watch with what it waits for and pauses it while it compiles (the state's init,
remat auto's candidates, the step for each new batch shape: the first batch, an aspect or
caption-length bucket not seen before; with the first batch, the evaluation's programs) and while
the hosts wait for each other's compiles: a compile's length varies too much for one timeout.
The time between two steps includes the checkpoint saves and the validation runs that come
between them.

A process that was itself suspended (SIGSTOP, a paused VM) for longer than the timeout finds,
when it runs again, that its watch woke late; its line then says so ("this process was itself
suspended or not scheduled for X s"), so that it is not taken for a host that waited for a
stuck peer, and its event carries `suspended_s`.
"""
from __future__ import annotations

import faulthandler
import json
import os
import sys
import threading
import time
from typing import Callable

from svg_jax import process_exit

EXIT_STALLED = 7
# A wait that ends this much (or a timeout) later than asked: no scheduler delays a waiting
# thread so long; a stopped process (SIGSTOP, a paused VM or container) does.
SUSPENDED_S = 10.0


def _stack_and_exit(line: str) -> None:
  faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
  print(line, file=sys.stderr)
  process_exit.exit_process(EXIT_STALLED, line, now=True)


class StallWatch:
  """`expect(what)` before a wait that may hang, `beat(step)` after each step, `pause()` before a
  compile; when `timeout_s` (> 0) passes armed with no new call, the "stalled" event is appended
  to `events_path` (metrics.jsonl; None on the processes that do not write it) and
  `on_stall(line)` runs in the watch's thread (by default: the stacks, the line, exit 7). `step`,
  the event's, is the last step that ended (0 until the loop sets its state's step, then each
  beat's). `stop()` ends the watch."""

  def __init__(self, timeout_s: float, where: str,
               on_stall: Callable[[str], None] = _stack_and_exit, events_path: str | None = None):
    self.timeout_s = float(timeout_s)
    self.step = 0
    self._where = where
    self._on_stall = on_stall
    self._events_path = events_path
    # (what it waits for, what stalled if that does not come: in words; since when)
    self._armed: tuple[str, str, float] | None = None
    self._stopped = False
    self._changed = threading.Condition()
    self._thread: threading.Thread | None = None

  def expect(self, what: str) -> None:
    """Times `what` (e.g. "restoring checkpoint 6"), a wait that may be one for another host."""
    self._arm(what, f"{what} took over {self.timeout_s:g} s")

  def beat(self, step: int) -> None:
    """Step `step` has ended: times the next one."""
    self.step = step
    self._arm(f"the end of step {step + 1}",
              f"no step ended for {self.timeout_s:g} s after step {step}")

  def pause(self) -> None:
    with self._changed:
      self._armed = None
      self._changed.notify()

  def stop(self) -> None:
    with self._changed:
      self._stopped = True
      self._changed.notify()

  def _arm(self, waiting_for: str, stalled: str) -> None:
    if self.timeout_s <= 0:
      return
    with self._changed:
      self._armed = (waiting_for, stalled, time.monotonic())
      self._changed.notify()
      if self._thread is None:
        self._thread = threading.Thread(target=self._watch, name="stall-watch", daemon=True)
        self._thread.start()

  def _watch(self) -> None:
    """Lives while the watch is armed: a paused or stopped watch leaves no thread behind."""
    late = 0.0  # how much later than asked the last wait ended
    with self._changed:
      while not self._stopped and self._armed is not None:
        waiting_for, stalled, since = self._armed
        now = time.monotonic()
        left = since + self.timeout_s - now
        if left <= 0:
          break
        self._changed.wait(left)
        late = time.monotonic() - (now + left)
      else:
        self._thread = None  # the next arm starts another
        return
    suspended = late > min(self.timeout_s, SUSPENDED_S)  # this process stood still, not a peer
    if suspended:
      stalled += (f": this process was itself suspended or not scheduled for {late:.0f} s (its "
                  f"watch woke that much later than it asked)")
    self._append_event(waiting_for, late if suspended else None)
    self._on_stall(f"stalled: {stalled} (train.stall_timeout_s); every thread's stack is above. "
                   f"Rerun the same command to resume from the newest checkpoint in "
                   f"{self._where}")

  def _append_event(self, waiting_for: str, suspended_s: float | None = None) -> None:
    """Appends through a file of its own: the main thread, which may hold the logger's, is stuck
    (in XLA, a collective or a read), and the line must be on disk before the exit."""
    if self._events_path is None:
      return
    event = {"step": self.step, "event": "stalled", "waiting_for": waiting_for,
             "timeout_s": self.timeout_s}
    if suspended_s is not None:
      event["suspended_s"] = round(suspended_s, 1)
    try:
      with open(self._events_path, "a") as f:
        f.write(json.dumps(event) + "\n")
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:  # the stacks and the exit matter more than the event
      print(f"stall watch: could not write the stalled event to {self._events_path}: {e}",
            file=sys.stderr)
