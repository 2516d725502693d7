"""Text features of validation prompts, for a training run without a text encoder folder.

  python launch/prompt_features.py --text_encoder=gemma-2-2b --prompts_jsonl=prompts.jsonl \
      --out=validation_prompts.npz
  python launch/train.py --config=... --config.train.sample_every=1000 \
      --config.validation.prompts_file=prompts.jsonl \
      --config.validation.text_features=validation_prompts.npz

The file holds the prompts, their features and the empty prompt's (the CFG's unconditional rows),
encoded as launch/sample.py encodes them (svg_jax/train/validation.py: write_prompt_features).
The run's validation prompts must be these prompts, in this order.
"""
from absl import app, flags

from svg_jax import cli

flags.DEFINE_string("text_encoder", None, "local Gemma-2 folder (HF format)")
flags.DEFINE_string("tokenizer", None, "tokenizer folder (default: --text_encoder)")
flags.DEFINE_string("system_type", "base", "system prompt of text.SYSTEM_PROMPTS")
flags.DEFINE_integer("hidden_layer", -2, "hidden state the DiT reads (official -2)")
flags.DEFINE_multi_string("prompt", [], "a prompt (repeat the flag for several)")
flags.DEFINE_string("prompts_jsonl", None, "jsonl file, one object with `prompt` per line")
flags.DEFINE_string("out", None, "the .npz to write")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import ml_collections

  import os

  from svg_jax import text
  from svg_jax.train import validation
  from svg_jax.utils import writable_folders

  try:
    prompts = validation.read_prompts(ml_collections.ConfigDict(dict(
        prompts=tuple(FLAGS.prompt), prompts_file=FLAGS.prompts_jsonl or "")))
  except (ValueError, OSError) as e:  # a missing or bad --prompts_jsonl
    raise app.UsageError(str(e)) from e
  if not prompts:
    raise app.UsageError("give prompts with --prompt and/or --prompts_jsonl")
  if os.path.isdir(FLAGS.out):
    raise app.UsageError(f"--out {FLAGS.out} is a folder; give the .npz file to write")
  # Before the encoder loads: a folder that cannot take the file is said at once.
  folder = os.path.dirname(FLAGS.out) or "."
  writable_folders.check_writable_folder(folder, "the folder of --out", create=False)
  encoder = text.TextEncoder.from_pretrained(
      FLAGS.text_encoder, FLAGS.tokenizer, hidden_layer=FLAGS.hidden_layer,
      system_prompt=text.system_prompt(FLAGS.system_type), max_length=text.SAMPLE_MAX_LENGTH)
  os.makedirs(folder, exist_ok=True)
  validation.write_prompt_features(FLAGS.out, prompts, encoder)
  print(f"wrote the features of {len(prompts)} prompts to {FLAGS.out}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["text_encoder", "out"])
  cli.run(main)
