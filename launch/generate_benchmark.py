"""Generate the images of a benchmark in the layout its official scorer reads.

  python launch/generate_benchmark.py --benchmark=geneval \
      --prompts=../shared/assets/prompts/geneval_metadata.jsonl --outdir=geneval_out \
      --config configs/svg_t2i_2b.py --config.autoencoder.decoder_path=... \
      --config.autoencoder.stats_path=... --checkpoint=runs/stage4 --text_encoder=gemma-2-2b

Layouts (official recipe: 4 images per prompt, image k of prompt i from seed 42 + 4 i + k):
  geneval  <outdir>/{i:05d}/metadata.jsonl (the prompt's line) and
           <outdir>/{i:05d}/samples/{k:05d}.png
  dpg      <outdir>/<stem of filename>.png, a 2x2 grid of the 4 images (row-major)
Sharded: process p of P handles the prompts i with i % P == p (default: the JAX process index and
count; override with --process_index / --process_count to split over separate jobs); each process
splits its batches over its local devices. Resumable: prompts whose files all exist are skipped, a
GenEval prompt with some samples gets the missing ones; files appear atomically.
"""
from absl import app, flags
from ml_collections import config_flags

from svg_jax import sampling

config_flags.DEFINE_config_file("config", None, "ml_collections config with `model` and "
                                "`autoencoder` sections", lock_config=True)
flags.DEFINE_enum("benchmark", None, ["geneval", "dpg"], "output layout")
flags.DEFINE_string("prompts", None, "prompt jsonl (geneval_metadata.jsonl / dpg.jsonl format)")
flags.DEFINE_string("outdir", None, "output folder")
flags.DEFINE_integer("limit", 0, "only the first N prompts of the file (0: all)")
flags.DEFINE_string("checkpoint", None, "training workdir to load the DiT from")
flags.DEFINE_bool("ema", True, "with --checkpoint: the EMA params (--noema: the raw params)")
flags.DEFINE_integer("step", None, "with --checkpoint: this step instead of the newest")
flags.DEFINE_string("weights", None, "converted DiT weights (file or diffusers folder)")
flags.DEFINE_enum("format", None, ["flax", "official", "safetensors", "diffusers"],
                  "format of --weights")
flags.DEFINE_string("text_encoder", None, "Gemma-2 folder (HF layout: config, safetensors)")
flags.DEFINE_string("tokenizer", None, "tokenizer folder (default: --text_encoder)")
flags.DEFINE_string("system_type", "base", "system prompt (official eval: base)")
flags.DEFINE_integer("images_per_prompt", 4, "images per prompt (DPG grids need 4)")
flags.DEFINE_integer("steps", 50, "sampling steps (DPM steps / ODE grid points)")
flags.DEFINE_float("cfg", 4.0, "classifier-free guidance scale")
flags.DEFINE_enum("cfg_mode", "renorm", list(sampling.CFG_MODES), "CFG variant")
flags.DEFINE_float("shift", 10.0, "time shift of the sampling grid")
flags.DEFINE_enum("solver", "dpm", list(sampling.SOLVERS), "ODE solver")
flags.DEFINE_string("resolution", "1024x1024", "WIDTHxHEIGHT in pixels (multiples of 16)")
flags.DEFINE_integer("batch_size", 4, "images per jitted trajectory")
flags.DEFINE_integer("process_index", -1, "this shard (default: jax.process_index())")
flags.DEFINE_integer("process_count", -1, "number of shards (default: jax.process_count())")
flags.DEFINE_bool("shard", True, "split each batch over the local devices")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax

  from svg_jax import generate as gen
  from svg_jax import parallel

  try:  # before loading anything: a one-line error for bad input
    resolution = gen.parse_resolution(FLAGS.resolution)
    settings = gen.SamplerSettings(steps=FLAGS.steps, cfg_scale=FLAGS.cfg,
                                   cfg_mode=FLAGS.cfg_mode, shift=FLAGS.shift,
                                   solver=FLAGS.solver)
    settings.validate()
    items = gen.read_prompt_file(FLAGS.prompts, FLAGS.benchmark)
  except (ValueError, OSError) as e:
    raise app.UsageError(str(e)) from e
  if FLAGS.limit > 0:
    items = items[:FLAGS.limit]
  if (FLAGS.checkpoint is None) == (FLAGS.weights is None):
    raise app.UsageError("give exactly one of --checkpoint and --weights")
  parallel.initialize_distributed()
  index = jax.process_index() if FLAGS.process_index < 0 else FLAGS.process_index
  count = jax.process_count() if FLAGS.process_count < 0 else FLAGS.process_count
  if not 0 <= index < count:
    raise app.UsageError(f"--process_index {index} outside [0, {count})")

  mesh = None
  if FLAGS.shard and jax.local_device_count() > 1:
    # Processes work on disjoint prompts, so each one's mesh holds only its own devices.
    mesh = parallel.make_mesh(dict(data=-1, fsdp=1, tensor=1), jax.local_devices())
  generator = gen.Generator.from_config(
      FLAGS.config, text_encoder=FLAGS.text_encoder, tokenizer=FLAGS.tokenizer,
      system_type=FLAGS.system_type, checkpoint=FLAGS.checkpoint, ema=FLAGS.ema, step=FLAGS.step,
      weights=FLAGS.weights, weights_format=FLAGS.format, mesh=mesh)
  summary = gen.run_benchmark(generator, items, FLAGS.benchmark, FLAGS.outdir, resolution,
                              settings, batch_size=FLAGS.batch_size,
                              images_per_prompt=FLAGS.images_per_prompt, process_index=index,
                              process_count=count)
  print(f"done: {summary}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "benchmark", "prompts", "outdir", "text_encoder"])
  app.run(main)
