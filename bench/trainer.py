"""The whole trainer's throughput: launch/train.py's path (`svg_jax.train.trainer.train`) for a few
steps of any config, on synthetic records of its shapes, writing no checkpoint; one JSON line.

  python bench/trainer.py --config configs/tiny.py --steps 5 --peak_tflops 1
  python bench/trainer.py --config configs/svg_t2i_2b.py:stage1_256 --global_batch_size 32 \\
      --config.model.remat_policy=auto     # on a GPU: attention "auto" takes cuDNN

The run trains 2 x --steps steps with train.log_every = --steps: the first window holds the
compilation and the warm-up steps, the second is the measured steady state (the loop's own
metrics record). Validation is off and train.checkpoint_every = 0. Without --records, records of
the config's shapes go to a temporary folder: latents of data.resolution, captions of
data.max_caption_len tokens as the only caption bucket (one compiled shape, the longest).

Printed as the last stdout line: steps/s, img/s, tokens/s; model TFLOP/s per device and in all
(the analytic count behind the trainer's MFU, svg_jax/train/flop_count.py); MFU against
--peak_tflops (default the chip's, chip_specs.PEAK_TFLOPS; null on a CPU); the peak device memory
(memory_stats' peak_bytes_in_use, null where the backend keeps none); the seconds spent tracing,
lowering and compiling the train step (jax.monitoring events; the compiles of remat "auto"'s
candidates are `remat_auto_s`; a step loaded from the persistent compilation cache, named by
`compilation_cache`, costs only its tracing and lowering); the remat policy trained with; the
`XLA_FLAGS` it ran under; the last
loss; with --profile_steps K, the trainer's "profile" event of warm-up steps n-K+1..n (the trace's
path under --workdir and the milliseconds a step per class of op, svg_jax/train/profiling.py).
"""
import json
import os
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

from svg_jax import cli

config_flags.DEFINE_config_file("config", None, "ml_collections config file[:variant]",
                                lock_config=True)
flags.DEFINE_integer("steps", 5, "measured steps (as many again run first: compile + warm-up)")
flags.DEFINE_integer("global_batch_size", 0, "0: the config's train.global_batch_size")
flags.DEFINE_string("records", "", "a records folder to read (default: synthetic, temporary)")
flags.DEFINE_integer("num_records", 0, "synthetic records to write (0: max(2 x batch, 32))")
flags.DEFINE_string("workdir", "", "run folder for metrics.jsonl (default: temporary)")
flags.DEFINE_float("peak_tflops", 0.0, "peak TFLOP/s per device for MFU (0: the chip's)")
flags.DEFINE_integer("profile_steps", 0, "trace the last this many warm-up steps (train."
                     "profile_steps) and add their time per op class to the JSON")
FLAGS = flags.FLAGS

# jax.monitoring durations of one compile: tracing, lowering to StableHLO, XLA's compile.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


class _StepCompiles:
  """Seconds of each compile of the train step (jax.monitoring listener); XLA's compile event
  closes one, so the candidates of remat "auto", compiled before the run's step, come first."""

  def __init__(self):
    self.done: list[float] = []
    self._open = 0.0

  def __call__(self, event: str, duration: float, **kwargs) -> None:
    # fun_name is "train_step" (tracing) or "jit(train_step)" (lowering, compile)
    if event not in COMPILE_EVENTS or "train_step" not in str(kwargs.get("fun_name", "")):
      return
    self._open += duration
    if event == COMPILE_EVENTS[-1]:
      self.done.append(self._open)
      self._open = 0.0


def _synthetic_records(config, path: str) -> tuple[tuple[int, int], int]:
  """Records of the config's largest shapes in `path`; returns (latent hw, caption length)."""
  from svg_jax import autoencoder
  from svg_jax.data import synthetic
  from svg_jax.train import aot

  hw = aot.latent_hw(config)
  cap = int(config.data.max_caption_len)
  batch = int(config.train.global_batch_size)
  synthetic.write_random_dataset(
      path, buckets=[hw], num_records=FLAGS.num_records or max(2 * batch, 32),
      latent_channels=int(config.model.in_channels), text_dim=int(config.model.cap_feat_dim),
      caption_len=(cap - 1, cap - 1), records_per_shard=64,  # text_len = words + <bos>
      fingerprints=autoencoder.config_fingerprints(config.autoencoder))  # as the config's own
  return hw, cap


def _peak_memory_bytes() -> int | None:
  import jax
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # noqa: BLE001  (backends without allocator statistics)
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def _events(workdir: str, name: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r.get("event") == name]


def run(config, workdir: str) -> dict:
  import jax
  from jax import monitoring

  from svg_jax import config as config_lib
  from svg_jax.models import nextdit
  from svg_jax.train import chip_specs, remat, trainer

  n = FLAGS.steps
  with config.unlocked():
    if FLAGS.global_batch_size:
      config.train.global_batch_size = FLAGS.global_batch_size
    config.train.update(dict(num_steps=2 * n, log_every=n, checkpoint_every=0, sample_every=0,
                             eval_every=0))
  shape = (None, None)
  if FLAGS.records:
    with config.unlocked():
      config.data.path = FLAGS.records
  else:
    path = os.path.join(workdir, "records")
    shape = _synthetic_records(config, path)
    with config.unlocked():
      config.data.path = path
      config.data.caption_len_buckets = (shape[1],)
  if FLAGS.profile_steps:
    if not 0 < FLAGS.profile_steps < n:
      raise app.UsageError(f"--profile_steps must be in [1, {n - 1}] (the warm-up steps after "
                           f"the first), got {FLAGS.profile_steps}")
    with config.unlocked():
      config.train.update(dict(profile_steps=FLAGS.profile_steps,
                               profile_start=n - FLAGS.profile_steps))
  compiles = _StepCompiles()
  monitoring.register_event_duration_secs_listener(compiles)
  start = time.perf_counter()
  summary = trainer.train(config, workdir)
  wall = time.perf_counter() - start
  record = summary["last_record"]
  if summary["step"] != 2 * n or record is None or record["step"] != 2 * n:
    raise RuntimeError(f"the run stopped at step {summary['step']} of {2 * n}")
  profiled = _events(workdir, "profile")
  chosen = _events(workdir, remat.EVENT)
  tried = len(chosen[0].get("candidates", [])) if chosen else 0
  peak = FLAGS.peak_tflops or chip_specs.peak_tflops(config.train.chip)
  tflops_dev = record["tflops_per_device"]
  memory = _peak_memory_bytes()
  return {
      "config": config_flags.get_config_filename(FLAGS["config"]),
      "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
      "devices": jax.device_count(), "global_batch_size": int(config.train.global_batch_size),
      "latent_hw": shape[0], "cap_len": shape[1],
      "remat_policy": chosen[0]["policy"] if chosen else config.model.remat_policy,
      "attention_backend": _attention_backend(config),
      "layer_loop": nextdit.resolved_layer_loop(config_lib.nextdit_config(config)),
      "compute_dtype": config.model.compute_dtype,
      "warmup_steps": n, "steps": n,
      "steps_per_sec": record["steps_per_sec"], "images_per_sec": record["images_per_sec"],
      "tokens_per_sec": record["tokens_per_sec"],
      "tflops_per_device": tflops_dev, "tflops": tflops_dev * jax.device_count(),
      "peak_tflops": peak, "mfu": tflops_dev / peak if peak else None,
      "peak_memory_gib": None if memory is None else memory / 2 ** 30,
      "compile_s": sum(compiles.done[tried:]), "remat_auto_s": sum(compiles.done[:tried]),
      "compilation_cache": os.environ.get("JAX_COMPILATION_CACHE_DIR") or None,
      "xla_flags": os.environ.get("XLA_FLAGS") or None,
      "wall_s": wall, "loss": record["loss"],
      "profile": profiled[0] if profiled else None,
  }


def _attention_backend(config) -> str:
  """The attention the step ran: "auto" resolved as the model resolves it in this process."""
  import jax.numpy as jnp
  from svg_jax import config as config_lib
  from svg_jax.models import layers
  if config.model.attention_backend != "auto":
    return config.model.attention_backend
  cfg = config_lib.nextdit_config(config)
  return layers.auto_backend(cfg.head_dim, jnp.dtype(cfg.compute_dtype), plain=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.profile_steps and not FLAGS.workdir:  # the temporary run folder goes, trace and all
    raise app.UsageError("--profile_steps needs --workdir, where the trace is kept")
  from svg_jax.train import metrics
  metrics.console_logging()
  with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
    workdir = FLAGS.workdir or tmp
    os.makedirs(workdir, exist_ok=True)
    out = run(FLAGS.config, workdir)  # a config error (remat auto: nothing fits): cli.run's line
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main)
