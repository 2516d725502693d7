"""Reconstruct images through the SVG autoencoder; write original | reconstruction pairs.

  python launch/reconstruct.py --config configs/svg_t2i_2b.py \
      --config.autoencoder.encoder_path=dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth \
      --config.autoencoder.decoder_path=svg_autoencoder-P-stage3.ckpt \
      --images=photos/,cat.jpg --out=recon --resolution=1024

Each image is cropped to its closest aspect-ratio bucket of --resolution (the official DiT crop),
encoded and decoded; `<out>/<name>.png` holds the crop and its reconstruction side by side, and
PSNR (dB) / SSIM per image and their means are printed and written to `<out>/metrics.json`
(svg_jax/eval/reconstruction.py). Images that cannot be read are reported by name and counted,
never silently dropped.
"""
from absl import flags

from svg_jax import cli

cli.define_config_file("config", None, "ml_collections config file with an `autoencoder` section "
                       "(svg_jax.config.autoencoder_defaults)")
flags.DEFINE_list("images", None, "image files and/or folders (comma separated)")
flags.DEFINE_string("out", None, "output folder for the pairs and metrics.json")
flags.DEFINE_integer("resolution", 256, "bucket resolution of the crop (256, 512, 1024, ...)")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from svg_jax import autoencoder as ae_lib
  from svg_jax.eval import reconstruction
  from svg_jax.utils import writable_folders

  # Before anything loads: crops that exist and that SSIM can score, a folder for the results.
  reconstruction.check_resolution(FLAGS.resolution,
                                  int(FLAGS.config.autoencoder.encoder.patch_size))
  paths = ae_lib.list_images(FLAGS.images)
  writable_folders.check_writable_folder(FLAGS.out, "--out", create=False)
  ae = ae_lib.SVGAutoencoder.from_config(FLAGS.config)
  reconstruction.reconstruct_images(ae, paths, FLAGS.resolution, FLAGS.out)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "images", "out"])
  cli.run(main)
