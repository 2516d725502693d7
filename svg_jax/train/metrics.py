"""Training metrics: clu accumulation, JSONL + TensorBoard logs and the progress line (throughput,
MFU against `chip_specs`, ETA)."""
# No `from __future__ import annotations`: clu reads the metric classes from the annotations.
import json
import logging
import os
import time
from typing import Any

import flax.struct
import numpy as np
from clu import metrics as clu_metrics

from svg_jax import parallel
from svg_jax.train import chip_specs
from svg_jax.utils import progress

log = logging.getLogger(__name__)


class _QuietLibraries(logging.Filter):
  """Drops the per-save INFO chatter of Orbax so the progress lines stay readable."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def console_logging() -> None:
  """INFO on the console for our progress lines, without Orbax's per-save messages."""
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.INFO)
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  """Averages over a log window (lr: last value)."""
  loss: clu_metrics.Average.from_output("loss")
  grad_norm: clu_metrics.Average.from_output("grad_norm")
  caption_dropped: clu_metrics.Average.from_output("caption_dropped")
  lr: clu_metrics.LastValue.from_output("lr")


def metrics_path(workdir: str) -> str:
  return os.path.join(workdir, "metrics.jsonl")


class MetricsLogger:
  """Accumulates per-step metrics and writes a record every `log_every` steps.

  Records go to `<workdir>/metrics.jsonl` (one JSON object a line, flushed at once) and to
  TensorBoard event files in `<workdir>/tensorboard` (process 0 only), and a progress line to the
  log: step, loss, grad norm, lr, steps/s, images/s, tokens/s, TFLOP/s per device, MFU and ETA.
  The rates are the window's; the ETA is from the mean rate since `restart_clock` (the steps
  after the first, with the saves and evaluations among them), which a window that holds a
  checkpoint save does not swing.
  """

  def __init__(self, workdir: str, *, num_steps: int, num_devices: int, chip: str = "auto",
               is_main: bool = True):
    self.num_steps = num_steps
    self.num_devices = num_devices
    self.chip = chip_specs.detect_chip() if chip == "auto" else chip
    self.peak = chip_specs.peak_tflops(self.chip)
    self.is_main = is_main
    self._acc = None
    self._window = {"steps": 0, "images": 0, "tokens": 0, "flops": 0.0}
    self._t0 = time.perf_counter()
    self._run = {"steps": 0, "since": self._t0}  # timed steps since restart_clock: the ETA's rate
    self._jsonl = None
    self._tb = None
    if is_main:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(metrics_path(workdir), "a", buffering=1)
      from tensorboardX import SummaryWriter  # lazily: only the main process writes events
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def restart_clock(self) -> None:
    """Call after compilation / resume so that throughput excludes them."""
    self._t0 = time.perf_counter()
    self._window = {"steps": 0, "images": 0, "tokens": 0, "flops": 0.0}
    self._run = {"steps": 0, "since": self._t0}

  def add(self, host_metrics: dict[str, Any], *, images: int, tokens: int, flops: float,
          timed: bool = True) -> None:
    """Adds a step's metrics; `timed=False`: a step run before `restart_clock` (with its
    compile), whose work is left out of the throughput as its time is."""
    self._accumulate(host_metrics)
    if not timed:
      return
    w = self._window
    w["steps"] += 1
    self._run["steps"] += 1
    w["images"] += images
    w["tokens"] += tokens
    w["flops"] += flops

  def _accumulate(self, host_metrics: dict[str, Any]) -> None:
    """Adds a step's metrics to `self._acc` (whose `compute()` gives the window's record)."""
    with parallel.on_host_cpu():  # not tiny programs on every device of the mesh
      update = TrainMetrics.single_from_model_output(
          **{k: np.asarray(v, np.float32) for k, v in host_metrics.items()})
      self._acc = update if self._acc is None else self._acc.merge(update)

  def write(self, step: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Emits the accumulated window as one record and resets it; returns the record."""
    now = time.perf_counter()
    dt = max(now - self._t0, 1e-9)
    w = self._window
    record: dict[str, Any] = {"step": int(step)}
    if self._acc is not None:
      with parallel.on_host_cpu():
        record.update({k: float(v) for k, v in self._acc.compute().items()})
    if w["steps"]:
      steps_s = w["steps"] / dt
      tflops_dev = w["flops"] / dt / self.num_devices / 1e12
      record.update({"steps_per_sec": steps_s, "images_per_sec": w["images"] / dt,
                     "tokens_per_sec": w["tokens"] / dt, "tflops_per_device": tflops_dev,
                     "mfu": (tflops_dev / self.peak) if self.peak else None,
                     "eta_sec": (self.num_steps - step) * (now - self._run["since"])
                                / self._run["steps"]})
    record.update(extra or {})
    if self.is_main:
      self._jsonl.write(json.dumps(record) + "\n")
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)) and v is not None:
          self._tb.add_scalar(f"train/{k}", v, step)
      self._tb.flush()
      log.info(self.progress_line(record))
    self._acc = None
    self._t0 = now
    self._window = {"steps": 0, "images": 0, "tokens": 0, "flops": 0.0}
    return record

  def progress_line(self, r: dict[str, Any]) -> str:
    parts = [f"step {r['step']}/{self.num_steps}"]
    for key, fmt in (("loss", "loss {:.4f}"), ("grad_norm", "gnorm {:.3f}"), ("lr", "lr {:.2e}"),
                     ("steps_per_sec", "{:.2f} steps/s"), ("images_per_sec", "{:.1f} img/s"),
                     ("tokens_per_sec", "{:.0f} tok/s"),
                     ("tflops_per_device", "{:.3f} TFLOP/s/dev")):
      if r.get(key) is not None:
        parts.append(fmt.format(r[key]))
    if r.get("mfu") is not None:
      parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if r.get("eta_sec") is not None:
      parts.append(f"ETA {progress.hms(r['eta_sec'])}")
    if r.get("bad_records"):
      parts.append(f"{r['bad_records']} bad records replaced")
    return " | ".join(parts)

  def event(self, step: int, **fields) -> None:
    """A non-metric record (start, resume, checkpoint, stop, eval) in the JSONL log; the numbers
    of an "eval" event also go to TensorBoard as `eval/<name>`."""
    if not self.is_main:
      return
    self._jsonl.write(json.dumps({"step": int(step), **fields}) + "\n")
    if fields.get("event") == "eval":
      for k, v in fields.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(f"eval/{k}", v, step)
      self._tb.flush()

  def close(self) -> None:
    if self.is_main:
      self._jsonl.close()
      self._tb.close()
