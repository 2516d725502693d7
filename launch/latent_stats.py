"""Per-channel latent statistics of an encoder over images: the `autoencoder.stats_path` file.

  python launch/latent_stats.py --images=photos/,more/ --out=my_encoder_stats.pt \
      --config.autoencoder.encoder_path=my_dinov3.pth --config.precompute.resolution=256

The official statistics file fits the official DINOv3 ViT-S/16+ only; another encoder (other
weights, another size) needs its own. Each image is cropped as precompute crops it (its closest
aspect-ratio bucket of --resolution, default `precompute.resolution`), encoded by
`autoencoder.encoder_path`, and the mean / std per channel of the raw features over every patch
token of every image are written, atomically, in the official format with one row
(`{"mean", "std"}`: float32 [1, C]; read it with `autoencoder.stats_layer=-1`). Then precompute
and train with `--config.autoencoder.stats_path=<--out>`.

--config defaults to configs/precompute.py; another config file needs an `autoencoder` section.
Images that cannot be read, or whose shorter side is below `precompute.min_side` (precompute
skips them too), are reported by name and reason and counted; at most --batch_size
crops are held at a time; the batch is split over this process's devices. Exit status 2, with
one line on stderr, for a bad flag or config, an --out that exists (unless --overwrite), and
when no image could be encoded.
"""
import os

from absl import app, flags

from svg_jax import cli

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

cli.define_config_file("config", os.path.join(_REPO, "configs", "precompute.py"),
                       "ml_collections config file with an `autoencoder` section (and, for the "
                       "default --resolution, a `precompute` one)")
flags.DEFINE_list("images", None, "image files and/or folders (comma separated)")
flags.DEFINE_string("out", None, "statistics file to write (.pt)")
flags.DEFINE_integer("resolution", 0, "bucket resolution of the crops; 0: the config's "
                     "precompute.resolution (else 256)")
flags.DEFINE_integer("batch_size", 16, "images per encoder call (and most crops held at once)")
flags.DEFINE_integer("limit", 0, "use only the first N listed images (0: all)")
flags.DEFINE_bool("overwrite", False, "replace an existing --out")
flags.mark_flags_as_required(["images", "out"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from svg_jax import latent_stats_job

  if "autoencoder" not in FLAGS.config:
    raise app.UsageError("the config has no `autoencoder` section")
  latent_stats_job.make_stats_file(FLAGS.config, FLAGS.images, FLAGS.out,
                                   resolution=FLAGS.resolution, batch_size=FLAGS.batch_size,
                                   limit=FLAGS.limit, overwrite=FLAGS.overwrite)


if __name__ == "__main__":
  cli.run(main)
