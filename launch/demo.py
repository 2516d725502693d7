"""The embedded default end to end (README Quickstart), offline on CPU:
demo data -> decoder training -> precompute -> DiT training -> sampling -> ShapesGenEval.

  python launch/demo.py [--workdir runs/demo] [--preset small|full] [--dit_steps N]
Finished stages are cached in the workdir; an interrupted run resumes.
"""
from absl import flags

from svg_jax import cli

flags.DEFINE_string("workdir", "runs/demo", "where the demo writes data, checkpoints and results")
flags.DEFINE_enum("preset", "small", ["small", "full"],
                  "model sizes and budgets (svg_jax/demo/configs.py): small = a 128-channel "
                  "latent that 2 CPU cores learn in minutes; full = the ViT-S+ width (384 "
                  "channels) and a 16.7M DiT, for longer runs and GPUs")
flags.DEFINE_integer("num_train", None, "demo training images (default: the preset's)")
flags.DEFINE_integer("num_heldout", 300, "held-out prompts (combinations never seen in training)")
flags.DEFINE_integer("decoder_steps", None, "pixel-decoder training steps (default: the preset's)")
flags.DEFINE_integer("dit_steps", None, "DiT training steps (default: the preset's)")
flags.DEFINE_integer("sample_steps", 25, "DPM-Solver++ steps")
flags.DEFINE_float("cfg_scale", 4.0, "renorm-CFG scale")
flags.DEFINE_float("shift", 1.0, "time shift of the sampling grid")
flags.DEFINE_enum("text_weights", "word_context", ["word_context", "random"],
                  "demo Gemma-2 weights: constructed word + previous-word features, or HF's "
                  "random init (svg_jax/demo/text_encoder.py)")
flags.DEFINE_integer("seen_per_category", 20, "training prompts per category scored beside the "
                     "held-out ones (0: none)")
flags.DEFINE_integer("validate_every", 500, "DiT steps between validation grids and held-out "
                     "losses in TensorBoard (0: off)")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from svg_jax.demo import pipeline

  pipeline.run(pipeline.DemoSettings(
      workdir=FLAGS.workdir, preset=FLAGS.preset, num_train=FLAGS.num_train,
      num_heldout=FLAGS.num_heldout,
      decoder_steps=FLAGS.decoder_steps, dit_steps=FLAGS.dit_steps,
      sample_steps=FLAGS.sample_steps, cfg_scale=FLAGS.cfg_scale, shift=FLAGS.shift,
      text_weights=FLAGS.text_weights, validate_every=FLAGS.validate_every,
      seen_per_category=FLAGS.seen_per_category))


if __name__ == "__main__":
  cli.run(main)
