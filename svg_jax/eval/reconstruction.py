"""Images through the SVG autoencoder and back: each image cropped as the DiT's data is (its
closest aspect-ratio bucket), encoded, decoded; `<out>/<name>.png` holds the crop and its
reconstruction side by side, `<out>/metrics.json` PSNR / SSIM per image and their means. Images
that cannot be read are reported by name and counted, never silently dropped."""
from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import numpy as np

from svg_jax import autoencoder as ae_lib
from svg_jax.data import buckets
from svg_jax.data.images import BadImageError
from svg_jax.eval import image_metrics
from svg_jax.input_errors import InputError
from svg_jax.utils import atomic_files

METRICS_FILE = "metrics.json"


def check_resolution(resolution: int, patch_size: int) -> None:
  """InputError unless `resolution` gives crops of whole patches that SSIM can score."""
  sides = [min(b) for b in buckets.buckets_for_resolution(resolution, patch_size)] if (
      resolution > 0) else []
  if not sides:
    raise InputError(f"--resolution {resolution} gives no crop of whole {patch_size}-pixel "
                     f"patches: use a positive multiple of {patch_size} (256, 512, 1024...)")
  if min(sides) < image_metrics.SSIM_WINDOW:
    raise InputError(f"--resolution {resolution}: its narrowest crops are {min(sides)} px, SSIM "
                     f"needs at least {image_metrics.SSIM_WINDOW}")


def reconstruct_images(ae: ae_lib.SVGAutoencoder, paths: Sequence[str], resolution: int,
                       outdir: str, say: Callable[[str], None] = print) -> dict:
  """Writes the pairs and metrics.json of `paths` into `outdir` (made) and returns the summary
  written there; `say` gets a line per skipped image, per image and for the means."""
  os.makedirs(outdir, exist_ok=True)
  crops, bad = {}, []
  for path in paths:
    try:
      crops[path] = ae_lib.preprocess(path, resolution, ae.encoder_cfg.patch_size)
    except BadImageError as e:
      bad.append((path, e.reason))
      say(f"skipped {path}: {e.reason}")
  by_bucket: dict[tuple, list[str]] = {}
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
      atomic_files.save_png(os.path.join(outdir, name + ".png"),
                            np.concatenate([orig, rec], axis=1))
      results[path] = {"name": name, "bucket": list(bucket), "psnr": image_metrics.psnr(orig, rec),
                       "ssim": image_metrics.ssim(orig, rec)}
  for path in paths:
    if path in results:
      r = results[path]
      say(f"{path}\t{r['bucket'][0]}x{r['bucket'][1]}\tPSNR {r['psnr']:.2f} dB\t"
          f"SSIM {r['ssim']:.4f}")
  summary = {"images": [dict(path=p, **r) for p, r in results.items()],
             "skipped": [{"path": p, "reason": why} for p, why in bad]}
  if results:
    summary["mean_psnr"] = float(np.mean([r["psnr"] for r in results.values()]))
    summary["mean_ssim"] = float(np.mean([r["ssim"] for r in results.values()]))
    say(f"mean over {len(results)} images\tPSNR {summary['mean_psnr']:.2f} dB\t"
        f"SSIM {summary['mean_ssim']:.4f}" + (f"\t({len(bad)} skipped)" if bad else ""))
  atomic_files.write_text(os.path.join(outdir, METRICS_FILE), json.dumps(summary, indent=1))
  if not results:
    raise InputError(f"no image could be reconstructed ({len(bad)} skipped)")
  return summary
