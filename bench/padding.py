"""Padding waste at stage 1 (256 image tokens): which fraction of the joint sequence is caption padding.

Caption lengths: the demo captions and, as a proxy for real data, the GenEval and DPG prompt files,
each with the official training system prompt, tokenized with the demo tokenizer and truncated at the
training length 256. Batches of `--batch` (the official micro batch, 16) are formed as the pipeline forms
them; compared: the default length buckets, buckets chosen by `optimal_length_buckets`, and batches
grouped by length bucket.

  python bench/padding.py [--workdir runs/demo]
"""
import json
import os

from absl import app, flags

from svg_jax import cli

flags.DEFINE_string("workdir", "runs/demo", "demo workdir (its demo dataset / tokenizer are reused)")
flags.DEFINE_integer("batch", 16, "per-process batch size", lower_bound=1)
flags.DEFINE_integer("image_tokens", 256, "image tokens per sample (stage 1: 256x256 -> 16x16)",
                     lower_bound=0)
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import numpy as np

  from svg_jax import assets, text
  from svg_jax.data import length_buckets as lb
  from svg_jax.demo import shapes
  from svg_jax.demo.text_encoder import ensure_demo_text_encoder

  data_dir = os.path.join(FLAGS.workdir, "shapes")
  shapes.write_dataset(data_dir, 240, 120, 64, seed=0)
  demo = [item["prompt"] for item in shapes.read_split(data_dir, "train")]
  tokenizer = text.load_tokenizer(ensure_demo_text_encoder(
      os.path.join(FLAGS.workdir, "text_encoder"), demo + [
          item["prompt"] for item in shapes.read_split(data_dir, "heldout")]))
  sources = {"demo": demo}
  for name, file in (("geneval", assets.GENEVAL_PROMPTS), ("dpg", assets.DPG_PROMPTS)):
    with open(file) as f:
      sources[name] = [json.loads(line)["prompt"] for line in f if line.strip()]

  print(f"stage 1: {FLAGS.image_tokens} image tokens, batch {FLAGS.batch}, training truncation "
        f"{text.TRAIN_MAX_LENGTH}")
  print(f"{'captions':<10}{'median len':>11}{'buckets':>42}{'grouped':>9}{'padding':>9}")
  for name, captions in sources.items():
    _, mask = text.tokenize(tokenizer, captions, text.BASE_SYSTEM_PROMPT, text.TRAIN_MAX_LENGTH)
    lengths = mask.sum(1)
    multiples_of_32 = tuple(range(32, text.TRAIN_MAX_LENGTH + 1, 32))
    options = [((64, 128, 256), False), (multiples_of_32, False), (multiples_of_32, True)]
    for k in (4, 8):
      options.append((lb.optimal_length_buckets(lengths, k, 8, text.TRAIN_MAX_LENGTH), False))
    for buckets, grouped in options:
      frac = lb.padding_fraction(lengths, FLAGS.image_tokens, buckets, FLAGS.batch, grouped)
      print(f"{name:<10}{int(np.median(lengths)):>11}{str(buckets):>42}{str(grouped):>9}"
            f"{100 * frac:>8.1f}%")


if __name__ == "__main__":
  cli.run(main)
