"""How far the demo's caption features carry its held-out compositions (no images, no DiT).

  python research/probe_captions.py --data runs/demo/demo/shapes_64px_seed0 \
      --text_encoder runs/demo/text_encoder --system_type empty

Fits attention readers of several seeds on the distinct training captions' features and prints,
per ShapesGenEval category, how many held-out prompts they read right (mean and range over the
readers) against the same for the reference word-context encoding
(`research/caption_probe.py`). With --out, writes every reader's scores as JSON.
"""
import json

from absl import app, flags

from svg_jax import cli

flags.DEFINE_string("data", None, "shapes dataset folder (train.jsonl, heldout.jsonl)")
flags.DEFINE_string("text_encoder", None, "Gemma-2 folder (HF layout) the records were made with")
flags.DEFINE_string("system_type", "empty", "system prompt the records were made with (the demo: "
                    "empty)")
flags.DEFINE_integer("seeds", 5, "readers fit per encoding (seeds 0..N-1)")
flags.DEFINE_integer("steps", 1500, "Adam steps per reader (full batch)")
flags.DEFINE_integer("num_heads", 1, "attention heads of the reader (a divisor of 64: its channels "
                     "are split among them)")
flags.DEFINE_string("out", None, "JSON file for every seed's scores")
flags.mark_flags_as_required(["data", "text_encoder"])
FLAGS = flags.FLAGS


def _summary(runs: list[dict], category: str) -> str:
  values = [r[category] for r in runs]
  return f"{sum(values) / len(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def main(argv):
  del argv
  import numpy as np

  import caption_probe  # research/, beside this script
  from svg_jax import text
  from svg_jax.demo import shapes

  if FLAGS.seeds < 1:
    raise app.UsageError(f"--seeds must be >= 1, got {FLAGS.seeds}")
  if FLAGS.num_heads < 1 or caption_probe.READER_WIDTH % FLAGS.num_heads:
    raise app.UsageError(f"--num_heads must divide {caption_probe.READER_WIDTH}, got "
                         f"{FLAGS.num_heads}")
  train = caption_probe.distinct_prompts(shapes.read_split(FLAGS.data, "train"))
  heldout = caption_probe.distinct_prompts(shapes.read_split(FLAGS.data, "heldout"))
  prompts = train[0] + heldout[0]
  enc = text.TextEncoder.from_pretrained(FLAGS.text_encoder,
                                         system_prompt=text.system_prompt(FLAGS.system_type))
  ids, mask = enc.tokenize(prompts)
  feats, _ = enc.encode_tokens(ids, mask)
  feats = np.asarray(feats, np.float32)
  vocabulary = sorted({w for p in prompts for w in p.split()})
  ref, ref_mask = caption_probe.word_context_features(
      prompts, vocabulary, max(len(p.split()) for p in prompts))
  n = len(train[0])
  seeds = range(FLAGS.seeds)
  results = {}
  for name, f, m in (("text_encoder", feats, mask), ("word_context", ref, ref_mask)):
    print(f"fitting {FLAGS.seeds} readers on {name} features {f.shape[1:]}", flush=True)
    results[name] = caption_probe.probe((f[:n], m[:n], train[1]),
                                        (f[n:], m[n:], heldout[1], heldout[2]),
                                        seeds=seeds, steps=FLAGS.steps,
                                        num_heads=FLAGS.num_heads)
  print(f"\n{n} distinct training captions; {len(heldout[0])} distinct held-out prompts "
        f"({int(heldout[2].sum())} items, weighted by items). Held-out prompts read right by "
        f"{FLAGS.num_heads}-head readers that read every training caption right, mean [min, max]:")
  header = f"{'category':<14} {'text encoder':>20} {'word context':>20}"
  print(header)
  print("-" * len(header))
  for category in (*shapes.CATEGORIES, "overall"):
    print(f"{category:<14} " + " ".join(f"{_summary(results[k]['heldout'], category):>20}"
                                        for k in ("text_encoder", "word_context")))
  print(f"{'readers':<14} " + " ".join(
      f"{len(results[k]['heldout']):>11} ({results[k]['failed_fits']} refit)" for k in
      ("text_encoder", "word_context")))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  cli.run(main)
