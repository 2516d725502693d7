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
line per image (file, prompt, seed, the sampler settings and the files read). An --out that holds
an earlier run's images is an error unless --overwrite.
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
flags.DEFINE_bool("overwrite", False, "replace an earlier run's images in --out (without it, an "
                  "--out with a metadata.jsonl is an error)")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from svg_jax import sample_folder
  from svg_jax.data import jsonl
  from svg_jax.utils import writable_folders
  from svg_jax.utils.progress import Progress

  prompts = list(FLAGS.prompt)
  if FLAGS.prompts_jsonl:
    try:
      from_file = jsonl.prompts(FLAGS.prompts_jsonl)
    except (ValueError, OSError) as e:
      raise app.UsageError(str(e)) from None
    if not from_file:
      raise app.UsageError(f"--prompts_jsonl {FLAGS.prompts_jsonl} holds no prompts")
    prompts += from_file
  if not prompts:
    raise app.UsageError("give prompts with --prompt and/or --prompts_jsonl")
  if FLAGS.num_images < 1:
    raise app.UsageError(f"--num_images must be >= 1, got {FLAGS.num_images}")
  if FLAGS.grid_cols < 0:
    raise app.UsageError(f"--grid_cols must be >= 0 (0: about the square root), got "
                         f"{FLAGS.grid_cols}")
  resolution, settings = generator_flags.sampler_settings()
  jobs = [p for p in prompts for _ in range(FLAGS.num_images)]
  seeds = [FLAGS.seed + j for j in range(len(jobs))]
  if FLAGS.seed < 0 or seeds[-1] >= 2 ** 31:
    raise app.UsageError(f"--seed must be >= 0 and --seed + images - 1 below 2^31 (the seeds "
                         f"are {FLAGS.seed}..{seeds[-1]})")
  # Before anything is sampled: the folder must take the files, an earlier run's are not replaced
  # unless asked.
  writable_folders.check_writable_folder(FLAGS.out, "--out", create=False)
  sample_folder.check_folder(FLAGS.out, FLAGS.overwrite)
  generator = generator_flags.make_generator()
  images = generator.generate(jobs, seeds, resolution, settings, batch_size=FLAGS.batch_size,
                              progress=Progress(len(jobs), what="images"))
  sample_folder.write_folder(FLAGS.out, images, jobs, seeds,
                             generator_flags.provenance(settings, generator), FLAGS.grid_cols)
  print(f"wrote {len(images)} images, {sample_folder.GRID} and {sample_folder.METADATA} to "
        f"{FLAGS.out}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "text_encoder", "out"])
  cli.run(main)
