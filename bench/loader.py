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
        analytic FLOPs of the step (svg_jax/train/metrics.py, checked against XLA's count by
        launch/aot_compile.py) at `--mfu` of the chip's peak; a host with `chips_per_host` chips
        must deliver chips_per_host x (global batch / chips) samples per step, so the samples/s it
        needs do not depend on the slice size.

The loader must keep >= 10x ahead. `--threads` sets Grain read threads and `--workers` Grain worker
processes (training hosts have many cores; on a 2-core host 2 threads read ~1.5x faster than 1,
and 4 no faster than 2).

  python bench/loader.py [--shapes tiny,2b] [--threads 2] [--workers 0] [--rounds 4]
                         [--compression zstd,uncompressed]
"""
import argparse
import os
import statistics
import tempfile
import time

# (peak key in metrics.PEAK_TFLOPS, chips per host)
HOSTS = {"v5p": ("v5p", 4), "h100": ("h100", 8), "v5e": ("v5e", 4)}
TARGET = 10.0
CAPTION_LENGTHS = (64, 128)  # 2b: the padded caption lengths measured


def _config(name, *args):
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"bench_cfg_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


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
  from svg_jax.train import metrics

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
    flops = metrics.dit_train_flops(cfg, gb, (hw, hw), cap)
    if text_kind == "token_ids":  # the step also runs the frozen Gemma-2 forward
      flops += metrics.gemma2_forward_flops(Gemma2Config(), gb, cap)
    for host, (chip, per_host) in HOSTS.items():
      peak = metrics.PEAK_TFLOPS[chip] * 1e12
      per_chip = gb / (flops / (args.mfu * peak))  # samples/s one chip consumes
      need = per_chip * per_host
      ratios[(cap, host)] = samples_s / need
      print(f"  {host:4s} host ({per_host} chips, {args.mfu:.0%} MFU of "
            f"{peak / 1e12:.0f} TFLOP/s): step {flops / 1e15:.2f} PFLOP -> needs "
            f"{need:7.1f} samples/s; loader / need = {samples_s / need:6.2f}x "
            f"({'OK' if samples_s / need >= TARGET else 'BELOW'} the {TARGET:g}x target)")
  return ratios


def main(argv=None):
  from svg_jax import malloc_tuning
  malloc_tuning.tune()  # as the launch scripts do, before JAX starts
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shapes", default="tiny,2b")
  p.add_argument("--threads", type=int, default=2, help="Grain read threads")
  p.add_argument("--workers", type=int, default=0, help="2b: Grain worker processes")
  p.add_argument("--rounds", type=int, default=4)
  p.add_argument("--steps", type=int, default=3, help="tiny: train steps per round")
  p.add_argument("--loader-batches", type=int, default=40, help="tiny: batches per round")
  p.add_argument("--loader-batches-2b", type=int, default=6, help="2b: batches per round")
  p.add_argument("--batch-2b", type=int, default=16, help="2b: per-process batch")
  p.add_argument("--records-2b", type=int, default=192)
  p.add_argument("--mfu", type=float, default=0.4)
  p.add_argument("--compression", default="zstd,uncompressed",
                 help="2b: shard compressions to compare (records.COMPRESSIONS)")
  p.add_argument("--text", default="text_features",
                 help="2b: record text kinds to compare: text_features (precomputed Gemma-2 "
                      "states) and/or token_ids (online text encoder, records.TEXT_FIELDS)")
  p.add_argument("--workdir", default="", help="where the records go (default: a temp dir)")
  args = p.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or tmp
    shapes = args.shapes.split(",")
    # 2b first: after the tiny train step has run in this process, its reads were 30-40% slower
    # (threads blocked 3x as often; not page faults, not the garbage collector).
    if "2b" in shapes:
      for text_kind in args.text.split(","):
        for compression in args.compression.split(","):
          bench_2b(args, workdir, compression, text_kind)
    if "tiny" in shapes:
      bench_tiny(args, workdir)


if __name__ == "__main__":
  main()
