"""Convert model weights between formats.

  python launch/convert.py --model dit --config configs/svg_t2i_2b.py \
      --src consolidated.00-of-01.pth --src-format official --dst out/dit --dst-format diffusers
Formats: flax | official | safetensors | diffusers.
"""
from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
flags.DEFINE_enum("model", "dit", ["dit"], "which model's weights")
flags.DEFINE_string("src", None, "source path")
flags.DEFINE_string("src-format", None, "source format")
flags.DEFINE_string("dst", None, "destination path")
flags.DEFINE_string("dst-format", None, "destination format")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "dtype of written tensors "
                  "(official/safetensors/diffusers)")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import ml_dtypes
  import numpy as np

  from svg_jax import config as config_lib
  from svg_jax.convert import dit_io

  cfg = config_lib.nextdit_config(FLAGS.config)
  params = dit_io.load_dit(FLAGS.src, FLAGS["src-format"].value, cfg)
  dtype = np.float32 if FLAGS.dtype == "float32" else ml_dtypes.bfloat16
  dit_io.save_dit(params, FLAGS.dst, FLAGS["dst-format"].value, cfg, dtype=dtype)
  print(f"wrote {FLAGS.dst} ({FLAGS['dst-format'].value})")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "src", "src-format", "dst", "dst-format"])
  app.run(main)
