"""Generate images from prompts: PNGs, a grid image and metadata.jsonl.

  python launch/sample.py --config configs/svg_t2i_2b.py \
      --config.autoencoder.decoder_path=svg_autoencoder-P-stage3.ckpt \
      --weights=dit-stage4/consolidated.00-of-01.pth --format=official \
      --text_encoder=gemma-2-2b --prompt="a photo of a cat" --out=out

DiT weights: `--checkpoint=<training workdir>` (EMA params unless --noema; its saved `model`
section replaces the config's) or `--weights` + `--format` (flax | official | safetensors |
diffusers). The config gives the autoencoder (decoder and statistics paths) and the model section
for --weights. Image j (prompts in order, --num_images each) uses seed --seed + j and is written
as `<out>/{j:05d}.png`; `<out>/metadata.jsonl` has one line per image (file, prompt, seed,
caption_tokens and caption_cut, the sampler settings and the files read); `<out>/grid.png` holds
them all, for up to 64 images (sample_folder.GRID_MAX_IMAGES: more would make a PNG of hundreds
of MB, so it is left out, with a line saying so). An --out that holds an earlier run's images
(finished or interrupted) is an error unless --overwrite (replace them) or --resume (go on with
it: the same prompts, seeds and settings are required; images listed in its metadata.jsonl and
whole are kept, the others are made, with the caption length of the whole job as before).

Images are sampled, decoded and written --batch_size at a time, each batch's PNGs and metadata
lines as soon as it is decoded: memory holds one batch whatever the number of prompts, and an
interrupted run (Ctrl-C, out of memory) leaves the images written so far, listed in
metadata.jsonl.

An empty or blank prompt would give an image of no prompt (the empty one is the negative
prompt): refused unless --allow_empty_prompts. A prompt longer than the caption length (512 tokens
with <bos> and the system prompt, as the official sampler) is cut to it: a warning line says how
many, and each image's metadata records `caption_tokens` (the tokens the DiT saw, <bos> and the
system prompt included) and `caption_cut`.
"""
import sys

from absl import app, flags

from svg_jax import cli, sample_folder

import generator_flags

generator_flags.define(resolution="1024x1024", batch_size=1,
                       batch_size_help="images per jitted trajectory (0: all at once)")
flags.DEFINE_multi_string("prompt", [], "a prompt (repeat the flag for several)")
flags.DEFINE_string("prompts_jsonl", None, "jsonl file, one object with `prompt` per line")
flags.DEFINE_integer("num_images", 1, "images per prompt")
flags.DEFINE_integer("seed", 0, "seed of the first image; image j uses seed + j")
flags.DEFINE_integer("grid_cols", 0, "columns of grid.png (0: about the square root); grid.png "
                     f"is made for up to {sample_folder.GRID_MAX_IMAGES} images only")
flags.DEFINE_string("out", None, "output folder")
flags.DEFINE_bool("overwrite", False, "replace an earlier run's images in --out (without it, an "
                  "--out with a metadata.jsonl is an error)")
flags.DEFINE_bool("resume", False, "go on with an interrupted run in --out (the same prompts, "
                  "seeds and settings): its images are kept, the missing ones are made")
flags.DEFINE_bool("allow_empty_prompts", False, "sample empty or blank prompts (each gives an "
                  "image of no prompt) instead of refusing them")
FLAGS = flags.FLAGS


def read_prompts() -> tuple[list[str], list[str]]:
  """The --prompt and --prompts_jsonl prompts, in order, and where each came from (for messages:
  '--prompt 2', 'p.jsonl line 5')."""
  from svg_jax.data import jsonl

  prompts = list(FLAGS.prompt)
  sources = [f"--prompt {k + 1}" for k in range(len(prompts))]
  if FLAGS.prompts_jsonl:
    try:
      from_file = jsonl.prompts(FLAGS.prompts_jsonl)
      # jsonl.prompts took every non-blank line (it refuses a bad one): they number the prompts.
      numbers = [line.number for line in jsonl.lines(FLAGS.prompts_jsonl)]
    except (ValueError, OSError) as e:
      raise app.UsageError(str(e)) from None
    if not from_file:
      raise app.UsageError(f"--prompts_jsonl {FLAGS.prompts_jsonl} holds no prompts")
    prompts += from_file
    sources += [f"{FLAGS.prompts_jsonl} line {n}" for n in numbers]
  if not prompts:
    raise app.UsageError("give prompts with --prompt and/or --prompts_jsonl")
  empty = [k for k, p in enumerate(prompts) if not p.strip()]
  if empty and not FLAGS.allow_empty_prompts:
    more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
    raise app.UsageError(f"{sources[empty[0]]}: the prompt is empty or blank{more}, which gives "
                         "an image of no prompt; pass --allow_empty_prompts to sample it anyway")
  return prompts, sources


def main(argv):
  del argv
  from svg_jax.utils import writable_folders
  from svg_jax.utils.progress import Progress

  prompts, sources = read_prompts()
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
  if FLAGS.resume and FLAGS.overwrite:
    raise app.UsageError("--resume keeps an earlier run's images, --overwrite replaces them: "
                         "give one")
  writable_folders.check_writable_folder(FLAGS.out, "--out", create=False)
  sample_folder.check_folder(FLAGS.out, FLAGS.overwrite, FLAGS.resume)
  generator = generator_flags.make_generator()
  encoder = generator.text_encoder
  counts = generator_flags.count_caption_tokens(
      encoder, prompts, sources, ". metadata.jsonl marks their images caption_cut")
  fields = []
  for j in range(len(jobs)):
    tokens = int(counts[j // FLAGS.num_images])
    fields.append(dict(prompt=jobs[j], seed=seeds[j],
                       caption_tokens=min(tokens, encoder.max_length),
                       caption_cut=tokens > encoder.max_length))
  height, width = resolution
  folder = sample_folder.SampleFolder(
      FLAGS.out, generator_flags.provenance(settings, generator),
      resume_fields=([dict(f, width=width, height=height) for f in fields] if FLAGS.resume
                     else None))
  todo = [j for j in range(len(jobs)) if j not in folder.done]
  if folder.done:
    print(f"resuming {FLAGS.out}: {len(folder.done)} of {len(jobs)} images are there, "
          f"{len(todo)} to make", file=sys.stderr, flush=True)
  progress = Progress(len(todo), what="images")
  try:
    if todo:
      # The whole job's caption length, as an uninterrupted run pads every batch.
      batches = generator.image_batches(
          [jobs[j] for j in todo], [seeds[j] for j in todo], resolution, settings,
          batch_size=FLAGS.batch_size, text_length=generator.text_length(jobs))
      for part, images in batches:
        folder.add([todo[i] for i in part], images, [fields[todo[i]] for i in part])
        progress(part.stop)
  except BaseException:
    if folder.written:  # Ctrl-C or a failure: say what is kept
      progress.end_line()
      print(f"stopped: {len(folder.written)} of {len(jobs)} images are written to {FLAGS.out} "
            f"and listed in its {sample_folder.METADATA} (--resume goes on with it)",
            file=sys.stderr, flush=True)
    raise
  if folder.finish(FLAGS.grid_cols):
    print(f"wrote {len(jobs)} images, {sample_folder.GRID} and {sample_folder.METADATA} to "
          f"{FLAGS.out}")
  else:
    print(f"wrote {len(jobs)} images and {sample_folder.METADATA} to {FLAGS.out}; no "
          f"{sample_folder.GRID}: it is made for up to {sample_folder.GRID_MAX_IMAGES} images")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "text_encoder", "out"])
  cli.run(main)
