"""One progress line for long jobs: done / total, rate, elapsed and ETA.

On a terminal the line overwrites itself; elsewhere (logs, pipes) it is printed at most every
`min_interval` seconds as a new line, and once at the end.
"""
from __future__ import annotations

import math
import sys
import time


def hms(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  s = int(round(seconds))
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
  """`update(done=n)` adds n finished units (`good` counts the successful ones); calling the
  object with an absolute count (`progress(done, total)`) is the callback form samplers use."""

  def __init__(self, total: int, what: str = "items", stream=None, min_interval: float = 0.5):
    self.total, self.what = int(total), what
    self.done = self.good = 0
    self.stream = stream or sys.stderr
    self.min_interval = min_interval
    self.start = time.perf_counter()
    self._last = -math.inf
    self._overwrite = bool(getattr(self.stream, "isatty", lambda: False)())

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
    finished = self.done >= self.total
    if now - self._last < self.min_interval and not finished:
      return
    self._last = now
    end = "\n" if finished or not self._overwrite else ""
    self.stream.write(("\r" if self._overwrite else "") + self.line() + end)
    self.stream.flush()

  def line(self) -> str:
    elapsed = time.perf_counter() - self.start
    rate = self.done / elapsed if elapsed > 0 else 0.0
    eta = (self.total - self.done) / rate if rate > 0 else math.inf
    width = 24
    fill = width * min(self.done, self.total) // max(self.total, 1)
    return (f"[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {self.what} "
            f"{rate:.2f}/s elapsed {hms(elapsed)} ETA {hms(eta)}")
