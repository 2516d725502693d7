"""Interleaved timing: run contenders in alternating rounds and report ratios.

Absolute times on shared machines drift by +-10% or more between runs; alternating short rounds of
each contender and comparing min and median of the same run keeps the ratio meaningful.

`interleave` runs the contenders in this process. `interleave_processes` gives each its own
process, which then sleeps while the others run: process-wide settings of one contender (our
glibc malloc tuning, svg_jax/malloc_tuning.py, slows torch's CPU step by ~30%) then do not touch
the other. A contender's program builds its work and hands it to `serve`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Callable

_TAG = "@@harness "  # marks protocol lines on a contender's stdout; other lines pass through


def _alternate(names: list[str], rounds: int, per_round: int,
               run: Callable[[str, int], list[float]]) -> dict[str, list[float]]:
  times = {name: [] for name in names}
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
    for name in order:
      times[name] += run(name, per_round)
  return times


def _timed(fn: Callable[[], None], n: int) -> list[float]:
  out = []
  for _ in range(n):
    start = time.perf_counter()
    fn()
    out.append(time.perf_counter() - start)
  return out


def interleave(contenders: dict[str, Callable[[], None]], rounds: int = 6, per_round: int = 2,
               warmup: int = 1) -> dict[str, list[float]]:
  """Each contender is a zero-argument callable that completes one unit of work (and blocks on it).
  Returns seconds per call, per contender."""
  for fn in contenders.values():
    _timed(fn, warmup)
  return _alternate(list(contenders), rounds, per_round, lambda name, n: _timed(contenders[name], n))


def serve(fn: Callable[[], None], info: dict | None = None) -> None:
  """The contender's side of `interleave_processes`: announces `info` (JSON), then runs `fn` n
  times for each n read from stdin and answers with the seconds per call."""
  def send(message):
    sys.stdout.write(_TAG + json.dumps(message) + "\n")
    sys.stdout.flush()

  send({"info": info or {}})
  for line in sys.stdin:
    send({"times": _timed(fn, int(line))})


def _receive(proc: subprocess.Popen, name: str) -> dict:
  for line in proc.stdout:
    if line.startswith(_TAG):
      return json.loads(line[len(_TAG):])
    sys.stderr.write(line)
  raise RuntimeError(f"contender {name!r} exited with status {proc.wait()} before answering")


def interleave_processes(commands: dict[str, list[str]], rounds: int = 6, per_round: int = 2,
                         warmup: int = 1, envs: dict[str, dict[str, str]] | None = None
                         ) -> tuple[dict[str, list[float]], dict[str, dict]]:
  """`interleave` with each contender in a process of its own: commands maps a name to the argv of
  a program that calls `serve`, `envs` a name to environment variables that its process sets
  besides this one's (e.g. `malloc_tuning.OPT_OUT`: a contender's script that starts with
  `cli.run` tunes malloc unless told not to). Contenders are built one after the other. Returns the
  seconds per call and each contender's `info`."""
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # GPUs are shared by the two
  procs: dict[str, subprocess.Popen] = {}
  try:
    infos = {}
    for name, argv in commands.items():
      procs[name] = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=dict(env, **(envs or {}).get(name, {})))
      infos[name] = _receive(procs[name], name)["info"]

    def run(name, n):
      procs[name].stdin.write(f"{n}\n")
      procs[name].stdin.flush()
      return _receive(procs[name], name)["times"]

    for name in procs:
      run(name, warmup)
    return _alternate(list(procs), rounds, per_round, run), infos
  finally:
    for proc in procs.values():
      proc.stdin.close()
      try:
        proc.wait(timeout=120)
      except subprocess.TimeoutExpired:
        proc.kill()


def check_names(flag: str, given: list[str], known, where: str = "") -> None:
  """Refuses (`InputError`: one line, exit 2 under `cli.run`) the entries of --`flag` that are not
  `known` (defined in `where`), before any contender starts."""
  from svg_jax.input_errors import InputError

  unknown = [name for name in given if name not in known]
  if unknown:
    raise InputError(f"--{flag}: unknown {', '.join(map(repr, unknown))}; known"
                     f"{f' ({where})' if where else ''}: {', '.join(known)}")


def summarize(times: dict[str, list[float]], baseline: str, items_per_call: int, unit: str) -> str:
  """A table of min / median seconds, items/s and the ratio of our speed to the baseline's."""
  import statistics
  # The last column's rows are 25 wide; a longer baseline name still leaves 2 spaces before it.
  lines = [f"{'contender':<28}{'min s':>10}{'median s':>10}{unit + '/s':>14}"
           f"  {'speed vs ' + baseline:>23}"]
  base_min = min(times[baseline])
  base_med = statistics.median(times[baseline])
  for name, ts in times.items():
    tmin, tmed = min(ts), statistics.median(ts)
    lines.append(f"{name:<28}{tmin:>10.4f}{tmed:>10.4f}{items_per_call / tmed:>14.2f}"
                 f"{base_min / tmin:>11.2f}x (min){base_med / tmed:>6.2f}x")
  return "\n".join(lines)
