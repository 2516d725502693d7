"""One progress line for long jobs: done / total, rate, elapsed and ETA.

On a terminal the line overwrites itself, at most every TTY_INTERVAL_S seconds; elsewhere (logs,
pipes) it is printed as a new line at the first update, then at most every LOG_INTERVAL_S seconds,
and once at the end: a log keeps a line a minute or two, not 180 lines for a 90-second job.

The rate and the ETA count from the first update on, once there is a later one: the first batch
of a job carries its compiles (a sampler's first line said 33 minutes for an 8-minute job).
"""
from __future__ import annotations

import math
import sys
import time

TTY_INTERVAL_S = 0.5
LOG_INTERVAL_S = 30.0


def hms(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  s = int(round(seconds))
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
  """`update(done=n)` adds n finished units (`good` counts the successful ones); calling the
  object with an absolute count (`progress(done, total)`) is the callback form samplers use."""

  def __init__(self, total: int, what: str = "items", stream=None,
               min_interval: float | None = None):
    self.total, self.what = int(total), what
    self.done = self.good = 0
    self.stream = stream or sys.stderr
    self.start = time.perf_counter()
    self._last = -math.inf
    self._first = None  # (time, done) of the first update that counted work
    self._ended = self._open_line = False
    self._overwrite = bool(getattr(self.stream, "isatty", lambda: False)())
    if min_interval is None:
      min_interval = TTY_INTERVAL_S if self._overwrite else LOG_INTERVAL_S
    self.min_interval = min_interval

  def update(self, done: int = 0, good: int = 0) -> None:
    self.done += done
    self.good += good
    self._report()

  def __call__(self, done: int, total: int | None = None) -> None:
    self.done = int(done)
    if total is not None:
      self.total = int(total)
    self._report()

  def _report(self) -> None:
    now = time.perf_counter()
    if self._first is None and self.done > 0:
      self._first = (now, self.done)
    finished = self.done >= self.total
    if finished and self._ended:
      return  # the last line once, however often the count is set to the total again
    self._ended = finished
    if now - self._last < self.min_interval and not finished:
      return
    self._last = now
    end = "\n" if finished or not self._overwrite else ""
    self.stream.write(("\r" if self._overwrite else "") + self.line() + end)
    self.stream.flush()
    self._open_line = not end

  def end_line(self) -> None:
    """Ends a terminal's unfinished line (a job stopped early): what is printed next starts a
    line of its own."""
    if self._open_line:
      self.stream.write("\n")
      self.stream.flush()
      self._open_line = False

  def line(self) -> str:
    now = time.perf_counter()
    elapsed = now - self.start
    rate = self.done / elapsed if elapsed > 0 else 0.0
    if self._first is not None and self.done > self._first[1] and now > self._first[0]:
      rate = (self.done - self._first[1]) / (now - self._first[0])  # past the warm-up
    eta = (self.total - self.done) / rate if rate > 0 else math.inf
    width = 24
    fill = width * min(self.done, self.total) // max(self.total, 1)
    return (f"[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {self.what} "
            f"{rate:.2f}/s elapsed {hms(elapsed)} ETA {hms(eta)}")
