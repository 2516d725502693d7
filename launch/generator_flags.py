"""Flags shared by the launchers that generate images (sample.py, generate_benchmark.py,
evaluate.py): the config, where the DiT weights come from, the text encoder, the sampler settings,
and the helpers that turn them into a `Generator`."""
from absl import app, flags, logging

from svg_jax import cli, sampling

FLAGS = flags.FLAGS


def define(*, resolution: str, batch_size: int, shift: float = 10.0,
           system_type_help: str = "system prompt (base/align/aesthetics/real/4grid/empty; "
                                   "default: the run's, else base)",
           batch_size_help: str = "images per jitted trajectory") -> None:
  """Defines the shared flags; the defaults that differ between launchers are arguments."""
  cli.define_config_file("config", None, "ml_collections config with `model` and `autoencoder` "
                         "sections")
  flags.DEFINE_string("checkpoint", None, "training workdir to load the DiT from")
  flags.DEFINE_bool("ema", True, "with --checkpoint: the EMA params (--noema: the raw params)")
  flags.DEFINE_integer("step", None, "with --checkpoint: this step instead of the newest")
  flags.DEFINE_string("weights", None, "converted DiT weights (file or diffusers folder)")
  flags.DEFINE_enum("format", None, ["flax", "official", "safetensors", "diffusers"],
                    "format of --weights")
  flags.DEFINE_string("text_encoder", None, "Gemma-2 folder (HF layout: config, safetensors)")
  flags.DEFINE_string("tokenizer", None, "tokenizer folder (default: --text_encoder)")
  flags.DEFINE_string("system_type", None, system_type_help)
  flags.DEFINE_integer("hidden_layer", None, "Gemma-2 hidden state the prompts are encoded to "
                       "(default: the run's, else the official -2)")
  flags.DEFINE_integer("steps", 50, "sampling steps (DPM steps / ODE grid points)")
  flags.DEFINE_float("cfg", 4.0, "classifier-free guidance scale")
  flags.DEFINE_enum("cfg_mode", "renorm", list(sampling.CFG_MODES), "CFG variant")
  flags.DEFINE_float("renorm", 1.0, "renorm CFG: the guided velocity's norm is clipped to this "
                     "times the conditional one's (official 1; <= 0: no clip)")
  flags.DEFINE_float("shift", shift, "time shift of the sampling grid")
  flags.DEFINE_enum("solver", "dpm", list(sampling.SOLVERS), "ODE solver")
  flags.DEFINE_string("resolution", resolution, "WIDTHxHEIGHT in pixels (a multiple of the "
                      "decoder's pixels per token, e.g. a bucket such as 768x1344), or one number "
                      "for a square; with --checkpoint the default is the square its run's "
                      "validation grids sampled (validation.resolution, else data.resolution)")
  flags.DEFINE_integer("batch_size", batch_size, batch_size_help)
  flags.DEFINE_bool("shard", True, "split each batch over the local devices")


def sampler_settings():
  """(resolution, SamplerSettings) from the flags; bad values are a one-line usage error, raised
  before anything is loaded."""
  from svg_jax import generate as gen
  from svg_jax import text

  if (FLAGS.checkpoint is None) == (FLAGS.weights is None):
    raise app.UsageError("give exactly one of --checkpoint and --weights")
  if FLAGS.weights is not None and (FLAGS["step"].present or FLAGS["ema"].present):
    raise app.UsageError("--step and --ema/--noema apply to --checkpoint (a training workdir), "
                         "not to --weights")
  if FLAGS.batch_size < 0:
    raise app.UsageError(f"--batch_size must be >= 0, got {FLAGS.batch_size}")
  multiple = gen.config_pixels_per_token(FLAGS.config)
  spec = FLAGS.resolution
  if FLAGS.checkpoint is not None and not FLAGS["resolution"].present:
    # A 64 px demo run sampled at the 1024 px default took 24 GB and the OOM killer.
    from svg_jax import dit_checkpoint

    side = dit_checkpoint.saved_sample_resolution(FLAGS.checkpoint, FLAGS.step)
    if side is not None:
      spec = str(side)
      logging.info("resolution %dx%d: the run's own (--resolution sets another)", side, side)
  try:
    if FLAGS.system_type is not None:
      text.system_prompt(FLAGS.system_type)
    resolution = gen.parse_resolution(spec, multiple)
    settings = gen.SamplerSettings(steps=FLAGS.steps, cfg_scale=FLAGS.cfg,
                                   cfg_mode=FLAGS.cfg_mode, shift=FLAGS.shift,
                                   solver=FLAGS.solver, renorm=FLAGS.renorm)
    settings.validate()
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  return resolution, settings


def provenance(settings, generator) -> dict:
  """What, besides the prompt and the seed, decides a generated image: the sampler settings, the
  system prompt and every file the generator read (absolute paths; the checkpoint's step as
  loaded), for metadata and for the settings a benchmark folder pins."""
  import os

  def path(p):
    return os.path.abspath(p) if p else None

  ae = FLAGS.config.autoencoder
  # Only what decides the images: no guidance has no scale, only renorm-CFG clips.
  guided, clipped = settings.cfg_mode != "none", settings.cfg_mode == "renorm"
  return dict(steps=settings.steps, cfg=settings.cfg_scale if guided else None,
              cfg_mode=settings.cfg_mode, renorm=settings.renorm if clipped else None,
              shift=settings.shift, solver=settings.solver,
              **generator.text_settings,  # system_type, hidden_layer
              checkpoint=path(FLAGS.checkpoint), step=generator.checkpoint_step,
              ema=FLAGS.ema if FLAGS.checkpoint else None, weights=path(FLAGS.weights),
              format=FLAGS.format, text_encoder=path(FLAGS.text_encoder),
              tokenizer=path(FLAGS.tokenizer), decoder_path=path(ae.decoder_path),
              stats_path=path(ae.stats_path), stats_layer=int(ae.stats_layer),
              bf16_stats=bool(ae.bf16_stats))


def read_prompts(read, *args, limit: int = 0) -> list:
  """`read(*args)` (a prompt-file reader) with its errors as one-line usage errors, cut to the
  first `limit` items (0: all)."""
  if limit < 0:
    raise app.UsageError(f"--limit must be >= 0 (0: all prompts), got {limit}")
  try:
    items = read(*args)
  except (ValueError, OSError) as e:
    raise app.UsageError(str(e)) from e
  return items[:limit] if limit > 0 else items


def make_generator(devices=None):
  """The Generator the flags describe; with --shard, batches are split over `devices` (default:
  this process's local devices)."""
  import jax

  from svg_jax import generate as gen
  from svg_jax import parallel

  devices = jax.local_devices() if devices is None else devices
  mesh = None
  if FLAGS.shard and len(devices) > 1:
    mesh = parallel.make_mesh(dict(data=-1, fsdp=1, tensor=1), devices)
  return gen.Generator.from_config(
      FLAGS.config, text_encoder=FLAGS.text_encoder, tokenizer=FLAGS.tokenizer,
      system_type=FLAGS.system_type, hidden_layer=FLAGS.hidden_layer,
      checkpoint=FLAGS.checkpoint, ema=FLAGS.ema, step=FLAGS.step, weights=FLAGS.weights,
      weights_format=FLAGS.format, mesh=mesh)


def count_caption_tokens(encoder, prompts, sources, note: str = "") -> list[int]:
  """Each prompt's tokens before truncation; one warning line on stderr when the caption length
  cuts any (how many, the first one's `sources` entry and length), as the official sampler cuts
  them. `note` ends the line."""
  import sys

  counts = [int(c) for c in encoder.token_counts(prompts)]
  cut = [k for k, c in enumerate(counts) if c > encoder.max_length]
  if cut:
    print(f"warning: {len(cut)} of {len(prompts)} prompts are longer than the caption length "
          f"({encoder.max_length} tokens with <bos> and the system prompt) and are cut to it, "
          f"as the official sampler cuts them; the first: {sources[cut[0]]} ({counts[cut[0]]} "
          f"tokens){note}", file=sys.stderr, flush=True)
  return counts
