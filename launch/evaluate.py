"""Score a DiT on the demo's prompts: ShapesGenEval of one image per held-out prompt.

  python launch/evaluate.py --data=runs/demo/demo/shapes_64px_fixed_seed0 \
      --config configs/tiny.py --config.autoencoder.decoder_path=runs/demo/decoder.safetensors \
      --config.autoencoder.stats_path=runs/demo/demo/latent_stats_d128_l4_p8_seed0_64px.pt \
      --checkpoint=runs/demo/dit --text_encoder=runs/demo/text_encoder --system_type=empty

(the default demo's files; a `--preset full` demo's are shapes_64px_seed0, configs/tiny.py:full and
latent_stats_d384_l12_p8_seed0_64px.pt.) Prompts: the `--split` (default heldout: combinations
never seen in training) of a shapes dataset folder (`svg_jax/demo/shapes.py`), the first
`--limit`. Prints the per-category table; with --out also grid.png, grid_prompts.txt and
scores.json (an earlier evaluation's files there are replaced: scores.json names what it scored).
"""
from absl import flags

from svg_jax import cli

import generator_flags

generator_flags.define(resolution="64", batch_size=64, shift=1.0,
                       system_type_help="system prompt the records were made with (default: the "
                       "run's; the demo: empty)")
flags.DEFINE_string("data", None, "shapes dataset folder (train.jsonl, heldout.jsonl)")
flags.DEFINE_enum("split", "heldout", ["heldout", "train"], "which prompts")
flags.DEFINE_integer("limit", 0, "only the first N prompts (0: all)")
flags.DEFINE_string("out", None, "where grid.png and scores.json go (default: nowhere)")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import os

  from svg_jax.demo import evaluate, geneval, shapes
  from svg_jax.utils import writable_folders

  resolution, settings = generator_flags.sampler_settings()
  items = generator_flags.read_prompts(shapes.read_split, FLAGS.data, FLAGS.split,
                                       limit=FLAGS.limit)
  if FLAGS.out:  # before the images are made
    writable_folders.check_writable_folder(FLAGS.out, "--out", create=False)
  generator = generator_flags.make_generator()
  report = dict(split=FLAGS.split, data=os.path.abspath(FLAGS.data),
                generated_with=generator_flags.provenance(settings, generator))
  scores, _ = evaluate.evaluate(generator, items, resolution, settings,
                                batch_size=FLAGS.batch_size, outdir=FLAGS.out, report=report)
  print(f"ShapesGenEval, {FLAGS.split} prompts of {FLAGS.data}:")
  geneval.print_table(scores, evaluate.category_counts(items))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "data", "text_encoder"])
  cli.run(main)
