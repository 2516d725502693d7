"""Reconstruct images through the SVG autoencoder; write original | reconstruction pairs.

  python launch/reconstruct.py --config configs/svg_t2i_2b.py \
      --config.autoencoder.encoder_path=dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth \
      --config.autoencoder.decoder_path=svg_autoencoder-P-stage3.ckpt \
      --images=photos/,cat.jpg --out=recon --resolution=1024

Each image is cropped to its closest aspect-ratio bucket of --resolution (the official DiT crop;
a multiple of the patch size with a square bucket), encoded and decoded --batch_size at a time;
`<out>/<file name>.png` (the input's name with its extension, e.g. `cat.jpg.png`; files of one
name from several folders keep their folders below the one they share) holds the crop and its
reconstruction side by side. PSNR (dB) / SSIM per image are printed and appended to
`<out>/metrics.jsonl` as each chunk finishes, with a progress line and ETA on stderr;
`<out>/metrics.json` gets the settings, every image and the means at the end
(svg_jax/eval/reconstruction.py). Images that cannot be read, or whose shorter side is below
min(--min_side, --resolution), are reported by name and counted, never silently dropped.

An --out that holds an earlier run (metrics.json / metrics.jsonl) is refused unless --overwrite
(its listed files are removed first) or --resume (the same settings: finished images are kept).
An interrupted run keeps every finished image, listed in metrics.jsonl.
"""
from absl import flags

from svg_jax import cli

cli.define_config_file("config", None, "ml_collections config file with an `autoencoder` section "
                       "(svg_jax.config.autoencoder_defaults)")
flags.DEFINE_list("images", None, "image files and/or folders (comma separated)")
flags.DEFINE_string("out", None, "output folder for the pairs, metrics.jsonl and metrics.json")
flags.DEFINE_integer("resolution", 256, "bucket resolution of the crop (256, 512, 1024, ...)")
flags.DEFINE_integer("batch_size", 8, "images per encode + decode call (memory grows with it); "
                     "config autoencoder.batch_size > 0 splits each call further")
flags.DEFINE_integer("min_side", 64, "images whose shorter side is below min(min_side, "
                     "resolution) are skipped as too small (precompute's rule)")
flags.DEFINE_bool("overwrite", False, "replace an earlier run's reconstructions in --out")
flags.DEFINE_bool("resume", False, "go on with an interrupted run in --out (the same settings)")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import os

  from svg_jax import autoencoder as ae_lib
  from svg_jax.eval import reconstruction
  from svg_jax.input_errors import InputError
  from svg_jax.utils import writable_folders

  # Before anything loads: crops that exist and that SSIM can score, images to crop, a folder
  # for the results.
  c = FLAGS.config.autoencoder
  patch = int(c.encoder.patch_size)
  reconstruction.check_resolution(FLAGS.resolution, patch)
  if FLAGS.batch_size < 1:
    raise InputError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
  if FLAGS.min_side < 1:
    raise InputError(f"--min_side must be >= 1, got {FLAGS.min_side}")
  paths = reconstruction.unique_paths(ae_lib.list_images(FLAGS.images))
  writable_folders.check_writable_folder(FLAGS.out, "--out", create=False)
  reconstruction.check_out_folder(FLAGS.out, FLAGS.overwrite, FLAGS.resume)
  planned = reconstruction.plan(paths, FLAGS.resolution, patch, FLAGS.min_side)
  if not planned[0]:
    for path, why in planned[1]:
      print(f"skipped {path}: {why}")
    raise InputError(f"none of the {len(paths)} images can be reconstructed (skipped above)")
  fingerprints = ae_lib.config_fingerprints(c)
  settings = {"encoder_path": os.path.abspath(c.encoder_path), "encoder_prefix": c.encoder_prefix,
              "decoder_path": os.path.abspath(c.decoder_path),
              "decoder_format": c.decoder_format, "stats_path": os.path.abspath(c.stats_path),
              "stats_layer": int(c.stats_layer), "bf16_stats": bool(c.bf16_stats),
              "fingerprints": fingerprints}
  if FLAGS.resume:  # a run of other settings is refused before the weights load
    reconstruction.check_resumable(
        FLAGS.out, reconstruction.run_settings(settings, FLAGS.resolution, FLAGS.min_side))
  ae = ae_lib.SVGAutoencoder.from_config(FLAGS.config, fingerprints=fingerprints)
  reconstruction.reconstruct_images(ae, paths, FLAGS.resolution, FLAGS.out, settings=settings,
                                    batch_size=FLAGS.batch_size, min_side=FLAGS.min_side,
                                    resume=FLAGS.resume, planned=planned)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "images", "out"])
  cli.run(main)
