"""Reconstruct images through the SVG autoencoder; write original | reconstruction pairs.

  python launch/reconstruct.py --config configs/svg_t2i_2b.py \
      --config.autoencoder.encoder_path=dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth \
      --config.autoencoder.decoder_path=svg_autoencoder-P-stage3.ckpt \
      --images=photos/,cat.jpg --out=recon --resolution=1024

Each image is cropped to its closest aspect-ratio bucket of --resolution (the official DiT crop),
encoded and decoded; `<out>/<name>.png` holds the crop and its reconstruction side by side, and
PSNR (dB) / SSIM per image and their means are printed and written to `<out>/metrics.json`.
Images that cannot be read are reported by name and counted, never silently dropped.
"""
from absl import app, flags

from svg_jax import cli

cli.define_config_file("config", None, "ml_collections config file with an `autoencoder` section "
                       "(svg_jax.config.autoencoder_defaults)")
flags.DEFINE_list("images", None, "image files and/or folders (comma separated)")
flags.DEFINE_string("out", None, "output folder for the pairs and metrics.json")
flags.DEFINE_integer("resolution", 256, "bucket resolution of the crop (256, 512, 1024, ...)")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import json
  import os

  import numpy as np

  from svg_jax import autoencoder as ae_lib
  from svg_jax.data import buckets
  from svg_jax.data.images import BadImageError
  from svg_jax.eval import image_metrics
  from svg_jax.input_errors import InputError
  from svg_jax.utils import atomic_files, writable_folders

  # Before anything loads: crops that exist and that SSIM can score, a folder for the results.
  patch = int(FLAGS.config.autoencoder.encoder.patch_size)
  sides = [min(b) for b in buckets.buckets_for_resolution(FLAGS.resolution, patch)] if (
      FLAGS.resolution > 0) else []
  if not sides:
    raise app.UsageError(f"--resolution {FLAGS.resolution} gives no crop of whole {patch}-pixel "
                         f"patches: use a positive multiple of {patch} (256, 512, 1024...)")
  if min(sides) < image_metrics.SSIM_WINDOW:
    raise app.UsageError(f"--resolution {FLAGS.resolution}: its narrowest crops are {min(sides)} "
                         f"px, SSIM needs at least {image_metrics.SSIM_WINDOW}")
  paths = ae_lib.list_images(FLAGS.images)
  writable_folders.check_writable_folder(FLAGS.out, "--out", create=False)
  ae = ae_lib.SVGAutoencoder.from_config(FLAGS.config)
  os.makedirs(FLAGS.out, exist_ok=True)
  crops, bad = {}, []
  for path in paths:
    try:
      crops[path] = ae_lib.preprocess(path, FLAGS.resolution, ae.encoder_cfg.patch_size)
    except BadImageError as e:
      bad.append((path, e.reason))
      print(f"skipped {path}: {e.reason}")
  by_bucket = {}
  for path, (_, bucket) in crops.items():
    by_bucket.setdefault(bucket, []).append(path)
  results, used_names = {}, set()
  for bucket, group in sorted(by_bucket.items()):
    originals = np.stack([crops[p][0] for p in group])
    recons = ae.reconstruct(originals)  # one batch (and one compile) per bucket shape
    for path, orig, rec in zip(group, originals, recons):
      stem = os.path.splitext(os.path.basename(path))[0]
      name, k = stem, 1
      while name in used_names:
        name, k = f"{stem}_{k}", k + 1
      used_names.add(name)
      atomic_files.save_png(os.path.join(FLAGS.out, name + ".png"),
                            np.concatenate([orig, rec], axis=1))
      results[path] = {"name": name, "bucket": list(bucket), "psnr": image_metrics.psnr(orig, rec),
                       "ssim": image_metrics.ssim(orig, rec)}
  for path in paths:
    if path in results:
      r = results[path]
      print(f"{path}\t{r['bucket'][0]}x{r['bucket'][1]}\tPSNR {r['psnr']:.2f} dB\t"
            f"SSIM {r['ssim']:.4f}")
  summary = {"images": [dict(path=p, **r) for p, r in results.items()],
             "skipped": [{"path": p, "reason": why} for p, why in bad]}
  if results:
    summary["mean_psnr"] = float(np.mean([r["psnr"] for r in results.values()]))
    summary["mean_ssim"] = float(np.mean([r["ssim"] for r in results.values()]))
    print(f"mean over {len(results)} images\tPSNR {summary['mean_psnr']:.2f} dB\t"
          f"SSIM {summary['mean_ssim']:.4f}" + (f"\t({len(bad)} skipped)" if bad else ""))
  atomic_files.write_text(os.path.join(FLAGS.out, "metrics.json"), json.dumps(summary, indent=1))
  if not results:
    raise InputError(f"no image could be reconstructed ({len(bad)} skipped)")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "images", "out"])
  cli.run(main)
