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

import generator_flags

generator_flags.define(resolution="1024x1024", batch_size=4,
                       system_type_help="system prompt (official eval: base)")
flags.DEFINE_enum("benchmark", None, ["geneval", "dpg"], "output layout")
flags.DEFINE_string("prompts", None, "prompt jsonl (geneval_metadata.jsonl / dpg.jsonl format)")
flags.DEFINE_string("outdir", None, "output folder")
flags.DEFINE_integer("limit", 0, "only the first N prompts of the file (0: all)")
flags.DEFINE_integer("images_per_prompt", 4, "images per prompt (DPG grids need 4)")
flags.DEFINE_integer("process_index", -1, "this shard (default: jax.process_index())")
flags.DEFINE_integer("process_count", -1, "number of shards (default: jax.process_count())")
FLAGS = flags.FLAGS


def main(argv):
  from svg_jax import malloc_tuning
  malloc_tuning.tune()  # before JAX starts its CPU threads (see the module)
  del argv
  import jax

  from svg_jax import generate as gen
  from svg_jax import parallel

  resolution, settings = generator_flags.sampler_settings()  # before loading anything
  items = generator_flags.read_prompts(gen.read_prompt_file, FLAGS.prompts, FLAGS.benchmark,
                                       limit=FLAGS.limit)
  parallel.initialize_distributed()
  index = jax.process_index() if FLAGS.process_index < 0 else FLAGS.process_index
  count = jax.process_count() if FLAGS.process_count < 0 else FLAGS.process_count
  if not 0 <= index < count:
    raise app.UsageError(f"--process_index {index} outside [0, {count})")

  # Processes work on disjoint prompts, so each one's mesh holds only its own devices.
  generator = generator_flags.make_generator(jax.local_devices())
  summary = gen.run_benchmark(generator, items, FLAGS.benchmark, FLAGS.outdir, resolution,
                              settings, batch_size=FLAGS.batch_size,
                              images_per_prompt=FLAGS.images_per_prompt, process_index=index,
                              process_count=count)
  print(f"done: {summary}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "benchmark", "prompts", "outdir", "text_encoder"])
  app.run(main)
