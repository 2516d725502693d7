"""Convert model weights between formats.

  python launch/convert.py --model dit --config configs/svg_t2i_2b.py \
      --src consolidated.00-of-01.pth --src_format official --dst out/dit --dst_format diffusers
  python launch/convert.py --model dit --config configs/svg_t2i_2b.py:stage1_256 \
      --src runs/stage1 --src_format flax --dst out/dit --dst_format diffusers
  python launch/convert.py --model decoder --config configs/decoder.py:tiny \
      --src runs/demo/decoder --src_format flax --dst out/decoder.ckpt --dst_format official

Formats: flax | official | safetensors | diffusers.
  dit      (svg_jax/convert/dit_io.py) flax: a `task = "dit"` training workdir (the EMA params,
           raw with --noema, of its latest checkpoint or --step; the model config it saved must
           be --config's architecture) or a msgpack of our params, written as msgpack; official:
           the SVG-T2I `consolidated.00-of-01.pth`; safetensors: official keys; diffusers: a
           `Lumina2Transformer2DModel` folder.
  decoder  (svg_jax/convert/decoder_io.py) flax: a `task = "decoder"` training workdir (its
           latest checkpoint, or --step) or a msgpack of our params, written as msgpack;
           official: the SVG autoencoder Lightning `.ckpt` (`state_dict` with `decoder.*`);
           safetensors: official `decoder.*` keys (what the demo exports); diffusers: a folder
           with `config.json` (the kwargs of `diffusers.models.autoencoders.vae.Decoder`) and
           `diffusion_pytorch_model.safetensors` (its state dict).
The architecture comes from --config: `model` for the DiT, `autoencoder.decoder` for the decoder.
An existing --dst is replaced only with --overwrite (a diffusers folder as a whole: files of an
earlier export there go). Exit status 2, with one line on stderr, when the weights cannot be read,
do not fit the config or cannot be written.
"""
import sys

from absl import app, flags, logging

from svg_jax import cli

cli.define_config_file("config", None, "ml_collections config file")
flags.DEFINE_enum("model", "dit", ["dit", "decoder"], "which model's weights")
flags.DEFINE_string("src", None, "source path")
flags.DEFINE_enum("src_format", None, ["flax", "official", "safetensors", "diffusers"],
                  "source format (see the module docstring)")
flags.DEFINE_string("dst", None, "destination path")
flags.DEFINE_enum("dst_format", None, ["flax", "official", "safetensors", "diffusers"],
                  "destination format; decoder diffusers: a folder with config.json (the "
                  "vae.Decoder kwargs) + diffusion_pytorch_model.safetensors")
flags.DEFINE_integer("step", None, "flax training workdir source: the checkpoint step (default "
                     "the latest)")
flags.DEFINE_bool("ema", True, "dit, flax training workdir source: the EMA params (--noema: the "
                  "raw params)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype of written tensors "
                  "(official/safetensors/diffusers; flax writes fp32)")
flags.DEFINE_bool("overwrite", False, "replace an existing --dst (without it an existing file or "
                  "folder there is an error)")
FLAGS = flags.FLAGS


def _convert(dtype) -> None:
  from svg_jax.convert import weights_io

  if FLAGS["dtype"].present and FLAGS.dst_format == "flax":
    raise ValueError("--dtype applies to the official, safetensors and diffusers formats (flax "
                     "msgpack files hold fp32 params)")
  weights_io.check_destination(FLAGS.dst, folder=FLAGS.dst_format == "diffusers",
                               overwrite=FLAGS.overwrite)
  if FLAGS.model == "dit":
    from svg_jax import config as config_lib
    from svg_jax.convert import dit_io

    cfg = config_lib.nextdit_config(FLAGS.config)
    ema = FLAGS.ema if FLAGS["ema"].present else None  # given: the source must be a workdir
    params = dit_io.load_dit(FLAGS.src, FLAGS.src_format, cfg, step=FLAGS.step, ema=ema)
    dit_io.save_dit(params, FLAGS.dst, FLAGS.dst_format, cfg, dtype=dtype)
    return
  from svg_jax.convert import decoder_io
  from svg_jax.models.decoder import DecoderConfig

  if FLAGS["ema"].present:
    raise ValueError("--ema/--noema applies to --model dit only (decoder training keeps no EMA)")
  cfg = DecoderConfig.from_dict(FLAGS.config.autoencoder.decoder.to_dict())
  cfg.validate()
  params = decoder_io.load_decoder_weights(FLAGS.src, FLAGS.src_format, cfg, step=FLAGS.step)
  decoder_io.save_decoder_weights(params, FLAGS.dst, FLAGS.dst_format, cfg, dtype=dtype)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)  # Orbax's notes on reading a workdir are no news here
  import ml_dtypes
  import numpy as np

  dtype = np.float32 if FLAGS.dtype == "float32" else ml_dtypes.bfloat16
  try:
    _convert(dtype)
  except (ValueError, OSError) as e:
    # Key mismatches, unreadable, unsafe or absent files (InputError, a ValueError): one line.
    print(f"convert error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(2)
  print(f"wrote {FLAGS.dst} ({FLAGS.model}, {FLAGS.dst_format})")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "src", "src_format", "dst", "dst_format"])
  cli.run(main)
