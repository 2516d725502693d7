"""Generate images from prompts: PNGs, a grid image and metadata.jsonl.

  python launch/sample.py --config configs/svg_t2i_2b.py \
      --config.autoencoder.decoder_path=svg_autoencoder-P-stage3.ckpt \
      --config.autoencoder.stats_path=dinov3_s16p_layer_patchtoken_stats_dist.pt \
      --weights=dit-stage4/consolidated.00-of-01.pth --format=official \
      --text_encoder=gemma-2-2b --prompt="a photo of a cat" --outdir=out

DiT weights: `--checkpoint=<training workdir>` (EMA params unless --noema; its saved `model`
section replaces the config's) or `--weights` + `--format` (flax | official | safetensors |
diffusers). The config gives the autoencoder (decoder and statistics paths) and the model section
for --weights. Image j (prompts in order, --num_images each) uses seed --seed + j and is written
as `<outdir>/{j:05d}.png`; `<outdir>/grid.png` holds them all; `<outdir>/metadata.jsonl` has one
line per image (file, prompt, seed and the sampler settings).
"""
from absl import app, flags
from ml_collections import config_flags

from svg_jax import sampling

config_flags.DEFINE_config_file("config", None, "ml_collections config with `model` and "
                                "`autoencoder` sections", lock_config=True)
flags.DEFINE_string("checkpoint", None, "training workdir to load the DiT from")
flags.DEFINE_bool("ema", True, "with --checkpoint: the EMA params (--noema: the raw params)")
flags.DEFINE_integer("step", None, "with --checkpoint: this step instead of the newest")
flags.DEFINE_string("weights", None, "converted DiT weights (file or diffusers folder)")
flags.DEFINE_enum("format", None, ["flax", "official", "safetensors", "diffusers"],
                  "format of --weights")
flags.DEFINE_string("text_encoder", None, "Gemma-2 folder (HF layout: config, safetensors)")
flags.DEFINE_string("tokenizer", None, "tokenizer folder (default: --text_encoder)")
flags.DEFINE_string("system_type", "base", "system prompt (base/align/aesthetics/real/4grid/empty)")
flags.DEFINE_multi_string("prompt", [], "a prompt (repeat the flag for several)")
flags.DEFINE_string("prompts_jsonl", None, "jsonl file, one object with `prompt` per line")
flags.DEFINE_integer("num_images", 1, "images per prompt")
flags.DEFINE_integer("seed", 0, "seed of the first image; image j uses seed + j")
flags.DEFINE_integer("steps", 50, "sampling steps (DPM steps / ODE grid points)")
flags.DEFINE_float("cfg", 4.0, "classifier-free guidance scale")
flags.DEFINE_enum("cfg_mode", "renorm", list(sampling.CFG_MODES), "CFG variant")
flags.DEFINE_float("shift", 10.0, "time shift of the sampling grid")
flags.DEFINE_enum("solver", "dpm", list(sampling.SOLVERS), "ODE solver")
flags.DEFINE_string("resolution", "1024x1024", "WIDTHxHEIGHT in pixels (any multiple of 16, e.g. "
                    "a bucket such as 768x1344), or one number for a square")
flags.DEFINE_integer("batch_size", 1, "images per jitted trajectory (0: all at once)")
flags.DEFINE_integer("grid_cols", 0, "columns of grid.png (0: about the square root)")
flags.DEFINE_bool("shard", True, "split each batch over the local devices")
flags.DEFINE_string("outdir", None, "output folder")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import json
  import math
  import os

  import jax

  from svg_jax import generate as gen
  from svg_jax import parallel

  prompts = list(FLAGS.prompt)
  if FLAGS.prompts_jsonl:
    with open(FLAGS.prompts_jsonl) as f:
      for n, line in enumerate(f, 1):
        if line.strip():
          item = json.loads(line)
          if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise app.UsageError(f"{FLAGS.prompts_jsonl} line {n}: no string `prompt`")
          prompts.append(item["prompt"])
  if not prompts:
    raise app.UsageError("give prompts with --prompt and/or --prompts_jsonl")
  if FLAGS.num_images < 1:
    raise app.UsageError(f"--num_images must be >= 1, got {FLAGS.num_images}")
  if (FLAGS.checkpoint is None) == (FLAGS.weights is None):
    raise app.UsageError("give exactly one of --checkpoint and --weights")
  try:  # before loading anything: a one-line error for a bad size or sampler setting
    resolution = gen.parse_resolution(FLAGS.resolution)
    settings = gen.SamplerSettings(steps=FLAGS.steps, cfg_scale=FLAGS.cfg,
                                   cfg_mode=FLAGS.cfg_mode, shift=FLAGS.shift,
                                   solver=FLAGS.solver)
    settings.validate()
  except ValueError as e:
    raise app.UsageError(str(e)) from e

  mesh = None
  if FLAGS.shard and jax.local_device_count() > 1:
    mesh = parallel.make_mesh(dict(data=-1, fsdp=1, tensor=1), jax.local_devices())
  generator = gen.Generator.from_config(
      FLAGS.config, text_encoder=FLAGS.text_encoder, tokenizer=FLAGS.tokenizer,
      system_type=FLAGS.system_type, checkpoint=FLAGS.checkpoint, ema=FLAGS.ema, step=FLAGS.step,
      weights=FLAGS.weights, weights_format=FLAGS.format, mesh=mesh)

  jobs = [p for p in prompts for _ in range(FLAGS.num_images)]
  seeds = [FLAGS.seed + j for j in range(len(jobs))]
  images = generator.generate(jobs, seeds, resolution, settings, batch_size=FLAGS.batch_size,
                              progress=gen.Progress(len(jobs)))
  os.makedirs(FLAGS.outdir, exist_ok=True)
  h, w = resolution
  lines = []
  for j, (prompt, seed, img) in enumerate(zip(jobs, seeds, images)):
    name = f"{j:05d}.png"
    gen.atomic_save_png(img, os.path.join(FLAGS.outdir, name))
    lines.append(json.dumps(dict(file=name, prompt=prompt, seed=seed, width=w, height=h,
                                 steps=settings.steps, cfg=settings.cfg_scale,
                                 cfg_mode=settings.cfg_mode, shift=settings.shift,
                                 solver=settings.solver, system_type=FLAGS.system_type,
                                 checkpoint=FLAGS.checkpoint, ema=FLAGS.ema,
                                 weights=FLAGS.weights)))
  cols = FLAGS.grid_cols or math.ceil(math.sqrt(len(images)))
  gen.atomic_save_png(gen.make_grid(images, cols), os.path.join(FLAGS.outdir, "grid.png"))
  gen.atomic_write_text("\n".join(lines) + "\n", os.path.join(FLAGS.outdir, "metadata.jsonl"))
  print(f"wrote {len(images)} images, grid.png and metadata.jsonl to {FLAGS.outdir}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "text_encoder", "outdir"])
  app.run(main)
