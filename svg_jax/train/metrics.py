"""Training metrics: clu accumulation, JSONL + TensorBoard logs, the progress line, FLOPs and MFU.

Analytic FLOPs of one NextDiT train step (model FLOPs: activation recomputation is not counted).
With a batch of B samples, N image tokens (H*W / p^2), caption padded to Lc, S = N + Lc, and per
transformer block the matmul parameter count per token
    P_blk = d*(h*hd) + 2*d*(kv*hd) + (h*hd)*d + 3*d*F        (q, k, v, out, SwiGLU w1/w3/w2)
the forward pass costs
    F_fwd = 2*B*[ Lc*(Dc*d + R*P_blk) + N*(p^2*C*d + R*P_blk + d*p^2*C) + S*n_layers*P_blk
                 + (R + n_layers)*4*d*A + per-sample time/final adaLN terms ]
          + 4*B*h*hd*[ R*Lc^2 + R*N^2 + n_layers*S^2 ]       (QK^T and AV of every attention)
(Dc caption feature dim, R refiner layers, A = adaLN dim, F = SwiGLU width), and a train step is
3 * F_fwd (forward + backward twice the forward): the familiar 6 * params * tokens plus attention.
Attention is counted over the padded length (it is what the kernels compute).
"""
# No `from __future__ import annotations`: clu reads the metric classes from the annotations.
import json
import logging
import os
import time
from typing import Any, NamedTuple

import flax.struct
import jax
import numpy as np
from clu import metrics as clu_metrics

from svg_jax import parallel
from svg_jax.utils import progress

log = logging.getLogger(__name__)

# Peak dense bf16 TFLOP/s per chip (NVIDIA's data sheets give twice these "with sparsity");
# None where MFU is meaningless (CPU). The H200 has the H100's tensor cores (only its memory is
# larger and faster), so the SXM H100's peak; the PCIe and NVL H100s run at lower clocks.
PEAK_TFLOPS = {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0, "a100": 312.0,
               "h100": 989.0, "h100_pcie": 756.0, "h100_nvl": 835.0, "h200": 989.0, "cpu": None}


class TpuGeneration(NamedTuple):
  """The rest of a TPU generation's facts (Cloud TPU system-architecture pages), as
  launch/aot_compile.py --target builds its slices; the peak is `PEAK_TFLOPS` above."""
  # HBM per chip a program may use: XLA:TPU's "available HBM" (libtpu 0.0.42.1 refuses a larger
  # program with it); the spec sheets say 32, 16, 95 and 32 GB.
  hbm_gib: float
  torus_dims: int  # slices are AxB (2: v5e, v6e) or AxBxC (3: v4, v5p)
  cores_per_chip: int  # Cloud accelerator types count TensorCores: v4-32, v5p-32 are 16 chips
  chip_config: str  # libtpu chip config with one JAX device per chip (v4's megacore)
  max_chips: int  # the largest single slice
  host_bounds: tuple  # chips of one host as an (x, y, z) box


TPU_GENERATIONS = {
    "v4": TpuGeneration(30.75, 3, 2, "megacore", 4096, (2, 2, 1)),
    "v5e": TpuGeneration(15.75, 2, 1, "default", 256, (2, 2, 1)),
    "v5p": TpuGeneration(95.74, 3, 2, "default", 4096, (2, 2, 1)),
    "v6e": TpuGeneration(31.25, 2, 1, "default", 256, (2, 2, 1)),
}


class _QuietLibraries(logging.Filter):
  """Drops the per-save INFO chatter of Orbax so the progress lines stay readable."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def console_logging() -> None:
  """INFO on the console for our progress lines, without Orbax's per-save messages."""
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.INFO)
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())


def detect_chip(device=None) -> str:
  """Maps a jax device to a `PEAK_TFLOPS` key ("cpu" for anything unknown)."""
  device = device or jax.devices()[0]
  return chip_of(device.platform, device.device_kind)


def chip_of(platform: str, device_kind: str) -> str:
  """A `PEAK_TFLOPS` key from a platform ("tpu", "gpu", ...) and a device name as jax's
  `device_kind` or torch's `cuda.get_device_name` gives it ("cpu" for anything unknown)."""
  kind = device_kind.lower()
  if platform == "tpu":
    if "v6" in kind:
      return "v6e"
    if "v5 lite" in kind or "v5e" in kind or "v5litepod" in kind:
      return "v5e"
    if "v5" in kind:
      return "v5p"
    if "v4" in kind:
      return "v4"
  if platform == "gpu":
    if "h100" in kind:
      return "h100_pcie" if "pcie" in kind else "h100_nvl" if "nvl" in kind else "h100"
    for chip in ("h200", "a100"):
      if chip in kind:
        return chip
  return "cpu"


def peak_tflops(chip: str) -> float | None:
  if chip == "auto":
    chip = detect_chip()
  if chip not in PEAK_TFLOPS:
    raise ValueError(f"train.chip {chip!r} is not one of {['auto'] + sorted(PEAK_TFLOPS)}")
  return PEAK_TFLOPS[chip]


def _gqa_swiglu_block_params(dim: int, heads: int, kv_heads: int, head_dim: int, ffn: int) -> int:
  """Matmul weights of a GQA attention + gated-FFN block (q, k, v, o and three FFN matrices)."""
  attn = dim * heads * head_dim + 2 * dim * kv_heads * head_dim + heads * head_dim * dim
  return attn + 3 * dim * ffn


def block_matmul_params(cfg) -> int:
  """Matmul weights applied to every token of one transformer block (see the module docstring)."""
  return _gqa_swiglu_block_params(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim)


def dit_train_flops(cfg, batch: int, latent_hw: tuple[int, int], cap_len: int) -> float:
  """FLOPs of one train step (forward + backward) of the NextDiT `cfg` on one batch."""
  p = cfg.patch_size
  n = (latent_hw[0] // p) * (latent_hw[1] // p)
  lc, s = cap_len, n + cap_len
  d, a, r, layers = cfg.dim, cfg.adaln_dim, cfg.n_refiner_layers, cfg.n_layers
  pb = block_matmul_params(cfg)
  patch_dim = p * p * cfg.in_channels
  per_token = (lc * (cfg.cap_feat_dim * d + r * pb)
               + n * (patch_dim * d + r * pb + d * patch_dim)
               + s * layers * pb)
  # Per sample: timestep MLP, adaLN of modulated blocks (4d each) and of the final layer (d).
  per_sample = cfg.t_freq_dim * a + a * a + (r + layers) * a * 4 * d + a * d
  attention = 4 * cfg.n_heads * cfg.head_dim * (r * lc * lc + r * n * n + layers * s * s)
  forward = batch * (2 * (per_token + per_sample) + attention)
  return 3.0 * forward


def gemma2_forward_flops(cfg, batch: int, tokens: int) -> float:
  """FLOPs of the frozen text encoder's forward (online text mode) up to the hidden state the DiT
  reads (`cfg.hidden_layer` of transformers' `hidden_states`); Gemma2Config `cfg`."""
  per_token = _gqa_swiglu_block_params(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                                       cfg.head_dim, cfg.intermediate_size)
  # Scores and weighted sum, unmasked as XLA computes them.
  attention = 4 * cfg.num_heads * cfg.head_dim * tokens * tokens
  return float(batch * cfg.layers_needed * (2 * tokens * per_token + attention))


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
  """

  def __init__(self, workdir: str, *, num_steps: int, num_devices: int, chip: str = "auto",
               is_main: bool = True):
    self.num_steps = num_steps
    self.num_devices = num_devices
    self.chip = detect_chip() if chip == "auto" else chip
    self.peak = peak_tflops(self.chip)
    self.is_main = is_main
    self._acc = None
    self._window = {"steps": 0, "images": 0, "tokens": 0, "flops": 0.0}
    self._t0 = time.perf_counter()
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

  def add(self, host_metrics: dict[str, Any], *, images: int, tokens: int, flops: float) -> None:
    with parallel.on_host_cpu():  # not tiny programs on every device of the mesh
      update = TrainMetrics.single_from_model_output(
          **{k: np.asarray(v, np.float32) for k, v in host_metrics.items()})
      self._acc = update if self._acc is None else self._acc.merge(update)
    w = self._window
    w["steps"] += 1
    w["images"] += images
    w["tokens"] += tokens
    w["flops"] += flops

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
                     "eta_sec": (self.num_steps - step) / steps_s})
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
