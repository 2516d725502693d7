"""Does the Grain loader keep ahead of the train step? Batches/s of the loader against steps/s.

Two record shapes (synthetic records from `synthetic.write_random_dataset`, read back through
`pipeline.make_pipeline` exactly as the trainer does):

  tiny  configs/tiny.py:full: latent 8x8x384, text 128-dim, 8-60 tokens, batch 16. The consumer
        is the real jitted DiT train step of `dit_task.DiTSetup` on the same batches, on this CPU,
        measured in alternating rounds with the loader in the same process (bench/harness.py
        practice).
  2b    stage 1 of configs/svg_t2i_2b.py: latent 16x16x384 bf16, text 2304-dim; one dataset per
        padded caption length (64 and 128 tokens, captions of half to all of it)
        (`--text token_ids`: the online text-encoder mode's records, token ids instead of
        features; its step also runs the frozen Gemma-2-2B forward, counted at the same MFU).
        A 2.6B step cannot run here, so the consumer is an accelerator host: the step time is the
        analytic FLOPs of the step (svg_jax/train/flop_count.py, checked against XLA's count by
        launch/aot_compile.py) at `--mfu` of the chip's peak; a host with `chips_per_host` chips
        must deliver chips_per_host x (global batch / chips) samples per step, so the samples/s it
        needs do not depend on the slice size.

The loader must keep >= 10x ahead. `--threads` sets Grain read threads and `--workers` Grain worker
processes (training hosts have many cores; on a 2-core host 2 threads read ~1.5x faster than 1,
and 4 no faster than 2).

  python bench/loader.py [--shapes tiny,2b] [--threads 2] [--workers 0] [--rounds 4]
                         [--compression zstd,uncompressed]

A bad flag (an unknown shape, compression or text kind) is one line on stderr, exit status 2.
"""
import os
import statistics
import tempfile
import time
import types

from absl import app, flags

from svg_jax import cli

# (peak key in chip_specs.PEAK_TFLOPS, chips per host)
HOSTS = {"v5p": ("v5p", 4), "h100": ("h100", 8), "v5e": ("v5e", 4)}
TARGET = 10.0
CAPTION_LENGTHS = (64, 128)  # 2b: the padded caption lengths measured
SHAPES = ("tiny", "2b")
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")

flags.DEFINE_list("shapes", list(SHAPES), f"record shapes to measure, of {SHAPES}")
flags.DEFINE_integer("threads", 2, "Grain read threads", lower_bound=1)
flags.DEFINE_integer("workers", 0, "2b: Grain worker processes", lower_bound=0)
flags.DEFINE_integer("rounds", 4, "measured rounds", lower_bound=1)
flags.DEFINE_integer("steps", 3, "tiny: train steps per round", lower_bound=1)
flags.DEFINE_integer("loader-batches", 40, "tiny: batches per round", lower_bound=1)
flags.DEFINE_integer("loader-batches-2b", 6, "2b: batches per round", lower_bound=1)
flags.DEFINE_integer("batch-2b", 16, "2b: per-process batch", lower_bound=1)
flags.DEFINE_integer("records-2b", 192, "2b: records written", lower_bound=1)
flags.DEFINE_float("mfu", 0.4, "2b: the consumer's MFU")
flags.DEFINE_list("compression", ["zstd", "uncompressed"],
                  "2b: shard compressions to compare (records.COMPRESSIONS)")
flags.DEFINE_list("text", ["text_features"],
                  "2b: record text kinds to compare: text_features (precomputed Gemma-2 states) "
                  "and/or token_ids (online text encoder, records.TEXT_FIELDS)")
flags.DEFINE_string("workdir", "", "where the records go (default: a temp dir)")


def _config(name, variant):
  return cli.read_config_file(os.path.join(CONFIGS, f"{name}.py:{variant}"))


def _pipeline(data_dir, batch, buckets, threads, dtype, workers=0):
  from svg_jax.data import pipeline
  cfg = pipeline.PipelineConfig(per_process_batch_size=batch, max_caption_len=buckets[-1],
                                caption_len_buckets=tuple(buckets), seed=0,
                                num_threads=threads, prefetch_buffer_size=max(threads, 2),
                                latent_dtype=dtype, text_dtype=dtype, num_workers=workers)
  return pipeline.make_pipeline(data_dir, cfg, process_index=0, process_count=1)


def _time_loader(it, n):
  start = time.perf_counter()
  for _ in range(n):
    next(it)
  return (time.perf_counter() - start) / n


def bench_tiny(args, workdir):
  import jax
  from absl import logging as absl_logging

  from svg_jax import parallel
  from svg_jax.data import synthetic
  from svg_jax.train import dit_task

  absl_logging.set_verbosity(absl_logging.ERROR)  # the empty-prompt stand-in is expected here
  config = _config("tiny", "full")  # the preset its docs/performance.md row measured
  m = config.model
  batch = int(config.train.global_batch_size)
  hw = int(config.data.resolution) // int(config.autoencoder.encoder.patch_size)
  buckets = tuple(config.data.caption_len_buckets) or (32, int(config.data.max_caption_len))
  data_dir = os.path.join(workdir, "tiny")
  synthetic.write_random_dataset(data_dir, buckets=[(hw, hw)], num_records=512,
                                 latent_channels=int(m.in_channels), text_dim=int(m.cap_feat_dim),
                                 caption_len=(7, 59), records_per_shard=128)
  it = _pipeline(data_dir, batch, buckets, args.threads, "float32")

  mesh = parallel.make_mesh(dict(config.mesh))
  setup = dit_task.DiTSetup(config, mesh)
  state = setup.init_state(0)
  first = next(it)
  device_batch = setup.device_batch(first)
  rng = jax.random.PRNGKey(0)
  box = {"state": state}

  def step():
    with parallel.mesh_context(mesh, setup.rules):
      box["state"], metrics = setup.step(box["state"], device_batch, rng)
    jax.block_until_ready(metrics)

  step()  # compile
  _time_loader(it, 4)
  loader_s, step_s = [], []
  for _ in range(args.rounds):  # alternate, so drift on a shared machine hits both alike
    loader_s.append(_time_loader(it, args.loader_batches))
    start = time.perf_counter()
    for _ in range(args.steps):
      step()
    step_s.append((time.perf_counter() - start) / args.steps)
  lb, st = statistics.median(loader_s), statistics.median(step_s)
  print(f"tiny: batch {batch}, latent {first['latent'].shape[1:]}, text {first['text'].shape[1:]} "
        f"(length buckets {buckets}), loader threads {args.threads}")
  print(f"  loader {1 / lb:9.1f} batches/s ({batch / lb:9.0f} samples/s)   "
        f"train step (CPU, {jax.device_count()} device) {1 / st:7.2f} steps/s   "
        f"loader / step = {st / lb:6.1f}x  ({'OK' if st / lb >= TARGET else 'BELOW'} "
        f"the {TARGET:g}x target)")
  return st / lb


def bench_2b(args, workdir, compression, text_kind="text_features"):
  from svg_jax import config as config_lib
  from svg_jax.data import synthetic
  from svg_jax.models.gemma2 import Gemma2Config
  from svg_jax.train import chip_specs, flop_count

  config = _config("svg_t2i_2b", "stage1_256")
  cfg = config_lib.nextdit_config(config)
  hw = int(config.data.resolution) // int(config.autoencoder.encoder.patch_size)
  gb = int(config.train.global_batch_size)
  batch = args.batch_2b
  ratios = {}
  for cap in CAPTION_LENGTHS:
    # Captions of cap/2 .. cap tokens (with <bos>), all padded to cap: the records the step reads.
    data_dir = os.path.join(workdir, f"2b_{compression}_{text_kind}_{cap}")
    start = time.perf_counter()
    synthetic.write_random_dataset(data_dir, buckets=[(hw, hw)], num_records=args.records_2b,
                                   latent_channels=cfg.in_channels, text_dim=cfg.cap_feat_dim,
                                   caption_len=(cap // 2, cap - 1), vocab_size=4096,
                                   records_per_shard=64, compression=compression,
                                   text_kind=text_kind)
    write_s = time.perf_counter() - start
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(data_dir) for f in fs)
    it = _pipeline(data_dir, batch, (cap,), args.threads, "bfloat16", args.workers)
    first = next(it)
    _time_loader(it, 2)
    lb = statistics.median(_time_loader(it, args.loader_batches_2b) for _ in range(args.rounds))
    samples_s = batch / lb
    text = first["text" if text_kind == "text_features" else "token_ids"]
    print(f"2b stage 1, {compression} shards, {text_kind}, captions of {cap // 2 + 1}-{cap} "
          f"tokens: per-process batch {batch}, latent {first['latent'].shape[1:]} "
          f"{first['latent'].dtype}, text {text.shape[1:]} {text.dtype}; {args.records_2b} "
          f"records, {size / args.records_2b / 1e6:.2f} MB each on disk (written in "
          f"{write_s:.1f} s); loader threads {args.threads}, workers {args.workers}")
    print(f"  loader {1 / lb:8.2f} batches/s = {samples_s:8.1f} samples/s "
          f"({samples_s * size / args.records_2b / 1e6:.0f} MB/s of records)")
    flops = flop_count.dit_train_flops(cfg, gb, (hw, hw), cap)
    if text_kind == "token_ids":  # the step also runs the frozen Gemma-2 forward
      flops += flop_count.gemma2_forward_flops(Gemma2Config(), gb, cap)
    for host, (chip, per_host) in HOSTS.items():
      peak = chip_specs.PEAK_TFLOPS[chip] * 1e12
      per_chip = gb / (flops / (args.mfu * peak))  # samples/s one chip consumes
      need = per_chip * per_host
      ratios[(cap, host)] = samples_s / need
      print(f"  {host:4s} host ({per_host} chips, {args.mfu:.0%} MFU of "
            f"{peak / 1e12:.0f} TFLOP/s): step {flops / 1e15:.2f} PFLOP -> needs "
            f"{need:7.1f} samples/s; loader / need = {samples_s / need:6.2f}x "
            f"({'OK' if samples_s / need >= TARGET else 'BELOW'} the {TARGET:g}x target)")
  return ratios


def _choices(name, allowed):
  unknown = [v for v in flags.FLAGS[name].value if v not in allowed]
  if unknown or not flags.FLAGS[name].value:
    raise app.UsageError(f"--{name} {','.join(flags.FLAGS[name].value)}: expected one or more of "
                         f"{', '.join(allowed)}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from svg_jax.data import records
  _choices("shapes", SHAPES)
  _choices("compression", tuple(records.COMPRESSIONS))
  _choices("text", records.TEXT_FIELDS)
  # This file's flags, dashes spelt as underscores (args.loader_batches_2b).
  args = types.SimpleNamespace(**{f.name.replace("-", "_"): f.value
                                  for f in flags.FLAGS.get_flags_for_module(__name__)})
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or tmp
    # 2b first: after the tiny train step has run in this process, its reads were 30-40% slower
    # (threads blocked 3x as often; not page faults, not the garbage collector).
    if "2b" in args.shapes:
      for text_kind in args.text:
        for compression in args.compression:
          bench_2b(args, workdir, compression, text_kind)
    if "tiny" in args.shapes:
      bench_tiny(args, workdir)


if __name__ == "__main__":
  cli.run(main)
