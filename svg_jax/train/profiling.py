"""A profile of a window of training steps, and its summary: where the device time goes.

`ProfileWindow` traces `train.profile_steps` steps after the first `train.profile_start` (so the
compile and the warm-up stay out) with `jax.profiler` on process 0. The trace goes to
`<workdir>/tensorboard/plugins/profile/<time>/<host>.xplane.pb`, where TensorBoard's Profile tab
finds it beside the run's scalars.

`summarize` reads such a file with `jax.profiler.ProfileData` and adds up the time of every HLO op
that ran: the events that carry an `hlo_op` statistic (the XLA runtime tags each kernel or thunk
with the op it runs), or those of a device plane's "XLA Ops" line where it has one, on the device
planes (GPU, TPU) or, when no device plane has any (XLA:CPU runs its thunks on host threads), on
the host's. Each op falls into one class by its name and
kernel name (`CLASSES`, first match wins), so the table says what share is matmuls, attention,
collectives, copies and the rest (elementwise and reduction fusions: the optimizer, EMA, norms,
casts).
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re

import jax
from absl import logging

# (class, pattern over "<hlo op> <kernel or event name>"), first match wins.
CLASSES = (
    ("attention", re.compile(r"fmha|sdpa|flash|attention|splash", re.I)),
    ("matmul", re.compile(r"gemm|xmma|nvjet|cutlass|cublas|\bdot|convolution|matmul|ynn_fusion",
                          re.I)),
    ("collective", re.compile(r"all-reduce|all-gather|reduce-scatter|all-to-all|"
                              r"collective-permute|nccl", re.I)),
    ("copy", re.compile(r"copy|transpose|memcpy|memset|dynamic-update-slice|dynamic-slice", re.I)),
    ("reduction", re.compile(r"reduce", re.I)),
)
OTHER = "elementwise/other"


@dataclasses.dataclass(frozen=True)
class OpTime:
  op: str  # the HLO op (instruction) name
  kind: str  # a class of CLASSES, or OTHER
  count: int  # executions in the trace
  seconds: float  # their summed duration


def op_class(op: str, kernel: str) -> str:
  text = f"{op} {kernel}"
  return next((name for name, pattern in CLASSES if pattern.search(text)), OTHER)


def latest_trace(directory: str) -> str:
  """The newest `*.xplane.pb` under `directory` (a file path is returned as it is)."""
  if os.path.isfile(directory):
    return directory
  found = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
  if not found:
    raise FileNotFoundError(f"no *.xplane.pb trace under {directory}")
  return max(found, key=os.path.getmtime)


OPS_LINE = "XLA Ops"  # a device plane's line of op events named by their op (TPU traces)


def _op_events(planes):
  """(op, kernel name, seconds) of the innermost events with an `hlo_op` statistic in `planes`,
  or of every event of a plane's `OPS_LINE` where it has one (then only that line counts): an
  event that encloses another on its line (a while loop around its body's thunks) is left out,
  so no time counts twice."""
  for plane in planes:
    lines = list(plane.lines)
    ops_lines = [line for line in lines if line.name == OPS_LINE]
    for line in ops_lines or lines:
      events = sorted(((e.start_ns, e.end_ns, str(dict(e.stats).get("hlo_op", e.name)), e.name)
                       for e in line.events
                       if ops_lines or any(k == "hlo_op" for k, _ in e.stats)),
                      key=lambda e: (e[0], -e[1]))
      enclosing = [False] * len(events)
      open_events: list[int] = []  # indices of the events that contain the current one
      for i, (start, end, _, _) in enumerate(events):
        while open_events and events[open_events[-1]][1] <= start:
          open_events.pop()
        if open_events:
          enclosing[open_events[-1]] = True
        open_events.append(i)
      for (start, end, op, name), parent in zip(events, enclosing):
        if not parent:
          yield op, name, (end - start) * 1e-9


def summarize(path: str) -> tuple[str, list[OpTime]]:
  """(where the ops ran, per-op totals sorted by time) of the trace file `path`."""
  profile = jax.profiler.ProfileData.from_file(path)
  planes = list(profile.planes)
  devices = [p for p in planes if p.name.startswith("/device:") and "CUSTOM" not in p.name]
  hosts = [p for p in planes if p.name.startswith("/host:")]
  events, where = [], ""
  for group in (devices, hosts):
    found = {p.name: list(_op_events([p])) for p in group}
    events = [e for plane_events in found.values() for e in plane_events]
    where = ", ".join(sorted(name for name, e in found.items() if e))
    if events:
      break
  totals: dict[str, list] = collections.defaultdict(lambda: [0, 0.0, ""])
  for op, kernel, seconds in events:
    t = totals[op]
    t[0] += 1
    t[1] += seconds
    t[2] = t[2] or kernel
  ops = [OpTime(op, op_class(op, kernel), n, s) for op, (n, s, kernel) in totals.items()]
  return where, sorted(ops, key=lambda o: -o.seconds)


def by_class(ops: list[OpTime]) -> dict[str, float]:
  """Seconds per class, largest first."""
  out: dict[str, float] = collections.defaultdict(float)
  for o in ops:
    out[o.kind] += o.seconds
  return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def report(path: str, steps: int, top: int = 15,
           summary: tuple[str, list[OpTime]] | None = None) -> str:
  """The summary as text: time per step by class, then the `top` ops. `summary`: what
  `summarize(path)` returned, when the caller has it already."""
  where, ops = summary or summarize(path)
  total = sum(o.seconds for o in ops)
  if not ops or total <= 0:
    return f"{path}: no HLO op events"
  per = max(steps, 1)
  lines = [f"{path}: {len(ops)} ops on {where}; {1e3 * total / per:.2f} ms of op time a step "
           f"over {steps} step(s)", "by class:"]
  lines += [f"  {kind:<18} {1e3 * s / per:10.3f} ms/step {s / total:7.1%}"
            for kind, s in by_class(ops).items()]
  lines.append(f"top {min(top, len(ops))} ops:")
  lines += [f"  {o.op[:60]:<60} {o.kind:<18} x{o.count / per:<6.0f} {1e3 * o.seconds / per:9.3f} "
            f"ms/step {o.seconds / total:7.1%}" for o in ops[:top]]
  return "\n".join(lines)


class ProfileWindow:
  """Traces steps start+1 .. start+steps of a run on process 0 (nothing when steps = 0)."""

  def __init__(self, workdir: str, *, start: int, steps: int):
    self.directory = os.path.join(workdir, "tensorboard")
    self.start, self.steps = start, steps
    self.enabled = steps > 0 and jax.process_index() == 0
    self.active = False

  def before_step(self, step: int, state) -> None:
    """Call with the number of steps done before running the next one."""
    if self.enabled and not self.active and step == self.start:
      jax.block_until_ready(state)  # the window holds its own steps only
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after_step(self, step: int, state) -> dict | None:
    """Call with the number of steps done; when this step closed the window, returns the
    "profile" event's fields (`stop`)."""
    if self.active and step >= self.start + self.steps:
      return self.stop(state, step)
    return None

  def stop(self, state, step: int) -> dict | None:
    """Ends an open trace at `step` (the run's end or a stop can cut a window short), logs its
    summary and returns {path, first_step, steps, ms_per_step by class}; None if none was open."""
    if not self.active:
      return None
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    self.active = False
    path = latest_trace(self.directory)
    steps = step - self.start
    summary = summarize(path)
    logging.info("profile of steps %d-%d (TensorBoard's Profile tab; python "
                 "launch/profile_summary.py %s --steps %d):\n%s", self.start + 1, step, path,
                 steps, report(path, steps, summary=summary))
    classes = by_class(summary[1])
    return {"path": path, "first_step": self.start + 1, "steps": steps,
            "ms_per_step": {k: 1e3 * v / max(steps, 1) for k, v in classes.items()}}

  def abort(self) -> None:
    """Closes a trace left open by an error, without a summary."""
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
