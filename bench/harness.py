"""Interleaved timing: run contenders in alternating rounds in one process and report ratios.

Absolute times on shared machines drift by +-10% or more between runs; alternating short rounds of each
contender and comparing min and median of the same run keeps the ratio meaningful.
"""
from __future__ import annotations

import time
from typing import Callable


def interleave(contenders: dict[str, Callable[[], None]], rounds: int = 6, per_round: int = 2,
               warmup: int = 1) -> dict[str, list[float]]:
  """Each contender is a zero-argument callable that completes one unit of work (and blocks on it).
  Returns seconds per call, per contender."""
  for fn in contenders.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in contenders}
  names = list(contenders)
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
    for name in order:
      for _ in range(per_round):
        start = time.perf_counter()
        contenders[name]()
        times[name].append(time.perf_counter() - start)
  return times


def summarize(times: dict[str, list[float]], baseline: str, items_per_call: int, unit: str) -> str:
  """A table of min / median seconds, items/s and the ratio of our speed to the baseline's."""
  import statistics
  lines = [f"{'contender':<28}{'min s':>10}{'median s':>10}{unit + '/s':>14}{'speed vs ' + baseline:>22}"]
  base_min = min(times[baseline])
  base_med = statistics.median(times[baseline])
  for name, ts in times.items():
    tmin, tmed = min(ts), statistics.median(ts)
    lines.append(f"{name:<28}{tmin:>10.4f}{tmed:>10.4f}{items_per_call / tmed:>14.2f}"
                 f"{base_min / tmin:>11.2f}x (min){base_med / tmed:>6.2f}x")
  return "\n".join(lines)
