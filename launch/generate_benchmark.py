"""Generate the images of a benchmark in the layout its official scorer reads.

  python launch/generate_benchmark.py --benchmark=geneval --out=geneval_out \
      --config configs/svg_t2i_2b.py --config.autoencoder.decoder_path=... \
      --config.autoencoder.stats_path=... --checkpoint=runs/stage4 --text_encoder=gemma-2-2b

Layouts (official recipe: 4 images per prompt, image k of prompt i from seed 42 + 4 i + k):
  geneval  <out>/{i:05d}/metadata.jsonl (the prompt's line) and
           <out>/{i:05d}/samples/{k:05d}.png
  dpg      <out>/<stem of filename>.png, a 2x2 grid of the 4 images (row-major)
Sharded: process p of P handles the prompts i with i % P == p (default: the JAX process index and
count; override with --process_index / --process_count to split over separate jobs); each process
splits its batches over its local devices. A process that is done waits for the others (up to
48 h) before it exits: JAX ends the processes of a run together. Resumable: prompts whose files
all exist are skipped, a GenEval prompt with some samples gets the missing ones; damaged files
are made again; files appear atomically. Prompts longer than the caption length are cut, with a
warning line. The first run writes what decides the images (weights, sampler, resolution, prompt
file...) to <out>/generation.json; a rerun with other settings is refused instead of mixing
images.
"""
from absl import app, flags

from svg_jax import cli

import generator_flags

generator_flags.define(resolution="1024x1024", batch_size=4,
                       batch_size_help="images per jitted trajectory on this process (rounded up "
                       "to a multiple of its devices; 0: all at once)",
                       system_type_help="system prompt (official eval: base)")
flags.DEFINE_enum("benchmark", None, ["geneval", "dpg"], "output layout")
flags.DEFINE_string("prompts", None, "prompt jsonl in the geneval_metadata.jsonl / dpg.jsonl format "
                    "(default: the official prompt file of --benchmark, shipped in svg_jax/assets)")
flags.DEFINE_string("out", None, "output folder")
flags.DEFINE_integer("limit", 0, "only the first N prompts of the file (0: all)")
flags.DEFINE_integer("images_per_prompt", 4, "images per prompt (DPG grids need 4)")
flags.DEFINE_integer("process_index", -1, "this shard (default: jax.process_index())")
flags.DEFINE_integer("process_count", -1, "number of shards (default: jax.process_count())")
FLAGS = flags.FLAGS
WAIT_FOR_OTHERS_S = 48 * 3600  # how long a process that is done waits at the exit for the others


def main(argv):
  del argv
  import jax

  from svg_jax import assets, latent_stats, multihost
  from svg_jax.eval import benchmarks
  from svg_jax.utils import writable_folders

  resolution, settings = generator_flags.sampler_settings()  # before loading anything
  benchmarks.check_request(FLAGS.benchmark, FLAGS.images_per_prompt)
  official = {"geneval": assets.GENEVAL_PROMPTS, "dpg": assets.DPG_PROMPTS}
  prompts = FLAGS.prompts or official[FLAGS.benchmark]
  items = generator_flags.read_prompts(benchmarks.read_prompt_file, prompts, FLAGS.benchmark,
                                       limit=FLAGS.limit)
  writable_folders.check_writable_folder(FLAGS.out, "--out", create=False)
  # The processes share no work, so one may finish hours before another (a resume, a slower
  # host): JAX's exit wait (300 s) would abort the ones still generating.
  multihost.initialize_distributed(shutdown_timeout_s=WAIT_FOR_OTHERS_S)
  index = jax.process_index() if FLAGS.process_index < 0 else FLAGS.process_index
  count = jax.process_count() if FLAGS.process_count < 0 else FLAGS.process_count
  if not 0 <= index < count:
    raise app.UsageError(f"--process_index {index} outside [0, {count})")

  # Processes work on disjoint prompts, so each one's mesh holds only its own devices.
  generator = generator_flags.make_generator(jax.local_devices())
  benchmarks.pin_settings(FLAGS.out, dict(
      benchmark=FLAGS.benchmark, prompts_sha256=latent_stats.file_sha256(prompts),
      images_per_prompt=FLAGS.images_per_prompt, resolution=resolution,
      **generator_flags.provenance(settings, generator)))
  generator_flags.count_caption_tokens(generator.text_encoder, [it["prompt"] for it in items],
                                       [f"line {i + 1}" for i in range(len(items))])
  summary = benchmarks.run_benchmark(generator, items, FLAGS.benchmark, FLAGS.out, resolution,
                              settings, batch_size=FLAGS.batch_size,
                              images_per_prompt=FLAGS.images_per_prompt, process_index=index,
                              process_count=count)
  print(f"done: {summary}", flush=True)
  if jax.process_count() > 1:
    print(f"waiting up to {WAIT_FOR_OTHERS_S // 3600} h for the other processes to finish "
          "(their progress is on their own hosts)", flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "benchmark", "out", "text_encoder"])
  cli.run(main, interrupted="interrupted (Ctrl-C): the images written so far stay; rerun the "
                            "same command to make the rest")
