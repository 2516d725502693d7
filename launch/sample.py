"""Generate images from prompts: PNGs, a grid image and metadata.jsonl.

  python launch/sample.py --config configs/svg_t2i_2b.py \
      --config.autoencoder.decoder_path=svg_autoencoder-P-stage3.ckpt \
      --weights=dit-stage4/consolidated.00-of-01.pth --format=official \
      --text_encoder=gemma-2-2b --prompt="a photo of a cat" --out=out

DiT weights: `--checkpoint=<training workdir>` (EMA params unless --noema; its saved `model`
section replaces the config's) or `--weights` + `--format` (flax | official | safetensors |
diffusers). The config gives the autoencoder (decoder and statistics paths) and the model section
for --weights. Image j (prompts in order, --num_images each) uses seed --seed + j and is written
as `<out>/{j:05d}.png`; `<out>/grid.png` holds them all; `<out>/metadata.jsonl` has one
line per image (file, prompt, seed and the sampler settings).
"""
from absl import app, flags

from svg_jax import cli

import generator_flags

generator_flags.define(resolution="1024x1024", batch_size=1,
                       batch_size_help="images per jitted trajectory (0: all at once)")
flags.DEFINE_multi_string("prompt", [], "a prompt (repeat the flag for several)")
flags.DEFINE_string("prompts_jsonl", None, "jsonl file, one object with `prompt` per line")
flags.DEFINE_integer("num_images", 1, "images per prompt")
flags.DEFINE_integer("seed", 0, "seed of the first image; image j uses seed + j")
flags.DEFINE_integer("grid_cols", 0, "columns of grid.png (0: about the square root)")
flags.DEFINE_string("out", None, "output folder")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import json
  import math
  import os

  from svg_jax import generate as gen
  from svg_jax.data import jsonl
  from svg_jax.utils import atomic_files
  from svg_jax.utils.progress import Progress

  prompts = list(FLAGS.prompt)
  if FLAGS.prompts_jsonl:
    try:
      prompts += jsonl.prompts(FLAGS.prompts_jsonl)
    except (ValueError, OSError) as e:
      raise app.UsageError(str(e)) from None
  if not prompts:
    raise app.UsageError("give prompts with --prompt and/or --prompts_jsonl")
  if FLAGS.num_images < 1:
    raise app.UsageError(f"--num_images must be >= 1, got {FLAGS.num_images}")
  if FLAGS.grid_cols < 0:
    raise app.UsageError(f"--grid_cols must be >= 0 (0: about the square root), got "
                         f"{FLAGS.grid_cols}")
  resolution, settings = generator_flags.sampler_settings()
  generator = generator_flags.make_generator()

  jobs = [p for p in prompts for _ in range(FLAGS.num_images)]
  seeds = [FLAGS.seed + j for j in range(len(jobs))]
  images = generator.generate(jobs, seeds, resolution, settings, batch_size=FLAGS.batch_size,
                              progress=Progress(len(jobs), what="images"))
  os.makedirs(FLAGS.out, exist_ok=True)
  h, w = resolution
  lines = []
  for j, (prompt, seed, img) in enumerate(zip(jobs, seeds, images)):
    name = f"{j:05d}.png"
    atomic_files.save_png(os.path.join(FLAGS.out, name), img)
    lines.append(json.dumps(dict(file=name, prompt=prompt, seed=seed, width=w, height=h,
                                 steps=settings.steps, cfg=settings.cfg_scale,
                                 cfg_mode=settings.cfg_mode, renorm=settings.renorm,
                                 shift=settings.shift,
                                 solver=settings.solver, system_type=FLAGS.system_type,
                                 checkpoint=FLAGS.checkpoint, ema=FLAGS.ema,
                                 weights=FLAGS.weights)))
  cols = FLAGS.grid_cols or math.ceil(math.sqrt(len(images)))
  atomic_files.save_png(os.path.join(FLAGS.out, "grid.png"), gen.make_grid(images, cols))
  atomic_files.write_text(os.path.join(FLAGS.out, "metadata.jsonl"), "\n".join(lines) + "\n")
  print(f"wrote {len(images)} images, grid.png and metadata.jsonl to {FLAGS.out}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "text_encoder", "out"])
  cli.run(main)
