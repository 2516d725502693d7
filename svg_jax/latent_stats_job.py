"""Per-channel latent statistics of an encoder over image files: the `autoencoder.stats_path`
file for encoder weights other than the official ones (launch/latent_stats.py).

Each image is cropped as the DiT's data is (`autoencoder.preprocess`), encoded to raw DINOv3
features, and the running statistics (`latent_stats.StatsAccumulator`) are written in the
official format (`latent_stats.save_latent_stats`). It sits above autoencoder.py, which reads
the statistics this job writes.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable, Sequence

import jax
import numpy as np

from svg_jax import autoencoder as ae_lib
from svg_jax import parallel
from svg_jax.convert.dinov3 import load_dinov3
from svg_jax.data import buckets
from svg_jax.data.image_pipeline import DEFAULT_MIN_SIDE, effective_min_side
from svg_jax.data.images import BadImageError
from svg_jax.input_errors import InputError, MissingInput
from svg_jax.latent_stats import LatentStats, StatsAccumulator, save_latent_stats
from svg_jax.models.dinov3 import DINOv3Config
from svg_jax.utils import atomic_files, writable_folders
from svg_jax.utils.progress import Progress

@dataclasses.dataclass
class ImageStats:
  """What `accumulate_image_stats` saw: the features' running statistics, the images encoded
  and the (path, reason) of each image that could not be read."""
  accumulator: StatsAccumulator
  used: list[str]
  skipped: list[tuple[str, str]]


def accumulate_image_stats(encode: Callable[[np.ndarray], Any], paths: Sequence[str],
                           resolution: int, patch_size: int, batch_size: int, *,
                           max_ratio: float = 4.0, min_side: int = 1,
                           say: Callable[[str], None] = print,
                           progress: Progress | None = None) -> ImageStats:
  """Per-channel statistics of `encode(uint8 crops [B, h, w, 3]) -> features [B, h', w', C]`
  over the images at `paths`, each cropped as the DiT's data is (`autoencoder.preprocess`: the
  closest aspect-ratio bucket of `resolution`, centre crop; a shorter side below `min_side` is
  skipped, as precompute skips it, not blown up into the statistics).

  Crops of one bucket share a shape, so they are batched per bucket; at most `batch_size` crops
  wait at a time (memory bounded by one batch): when that many wait, the bucket with the most is
  encoded. Images that cannot be read are reported through `say` and listed, not dropped.
  """
  acc = StatsAccumulator()
  out = ImageStats(acc, [], [])
  waiting: dict[tuple[int, int], list[tuple[str, np.ndarray]]] = {}

  def encode_bucket(bucket):
    group = waiting.pop(bucket)
    acc.update(encode(np.stack([crop for _, crop in group])))
    out.used.extend(path for path, _ in group)
    if progress is not None:
      progress.update(done=len(group), good=len(group))

  for path in paths:
    try:
      crop, bucket = ae_lib.preprocess(path, resolution, patch_size, max_ratio, min_side)
    except BadImageError as e:
      out.skipped.append((path, e.reason))
      say(f"skipped {path}: {e.reason}")
      if progress is not None:
        progress.update(done=1)
      continue
    waiting.setdefault(bucket, []).append((path, crop))
    if sum(len(g) for g in waiting.values()) >= batch_size:
      encode_bucket(max(waiting, key=lambda b: len(waiting[b])))
  for bucket in sorted(waiting):  # the rest, each bucket once
    encode_bucket(bucket)
  return out


def raw_feature_encoder(ae_config, batch_size: int, mesh=None):
  """An `SVGAutoencoder` (encoder only) for `ae_config` (a `config.autoencoder` section) whose
  `encode` gives the raw DINOv3 features: its statistics are mean 0, std 1 in fp32, and
  1 + 1e-8 rounds to 1 in fp32, so (f - 0) / (1 + 1e-8) is f bit for bit. Calls hold
  `batch_size` images (padded), split over `mesh`'s batch axes when given."""
  if not ae_config.encoder_path:
    raise InputError("set autoencoder.encoder_path to the encoder weights to compute "
                     "statistics for")
  cfg = DINOv3Config.from_dict(ae_config.encoder.to_dict())
  cfg.validate()
  params = load_dinov3(ae_config.encoder_path, cfg, prefix=ae_config.encoder_prefix)
  identity = LatentStats.from_arrays(np.zeros(cfg.dim), np.ones(cfg.dim), "identity")
  return ae_lib.SVGAutoencoder(stats=identity, encoder_params=params, encoder_cfg=cfg,
                               bf16_stats=False, batch_size=batch_size, mesh=mesh)


def check_stats_output(out: str, overwrite: bool) -> None:
  """InputError unless `out` can take a new statistics file: not a folder, not an existing file
  (unless `overwrite`), in a folder that exists and can be written."""
  if not out:
    raise InputError("no output file given (--out)")
  if os.path.isdir(out):
    raise InputError(f"--out {out} is a folder; give the .pt file to write")
  if os.path.lexists(out) and not overwrite:
    raise InputError(f"--out {out} exists; pass --overwrite to replace it")
  folder = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(folder):
    raise MissingInput(f"the folder of --out {out} does not exist")
  writable_folders.check_writable_folder(folder, "the folder of --out", create=False)


def make_stats_file(config, images: Sequence[str], out: str, *, resolution: int = 0,
                    batch_size: int = 16, limit: int = 0, overwrite: bool = False,
                    say: Callable[[str], None] = print, stream=None) -> ImageStats:
  """Writes `out` (atomically; the official format, one row) with the per-channel mean / std of
  the raw features of `config.autoencoder`'s encoder over `images` (files and folders, as
  `autoencoder.list_images` lists them; the first `limit` when > 0), cropped at `resolution`
  (0: `config.precompute.resolution` when the config has that section, else 256); images whose
  shorter side is below `precompute.min_side` (64) are skipped as precompute skips them.
  Progress goes to `stream` (stderr), a line per skipped image and the summary to `say`. Bad
  flags, an
  existing `out` without `overwrite`, no usable image: InputError, before the encoder loads
  where it can be known then."""
  c = config.autoencoder if "autoencoder" in config else config
  pre = config.get("precompute") if "autoencoder" in config else None
  resolution = int(resolution or (pre.resolution if pre is not None else 256))
  max_ratio = float(pre.max_ratio) if pre is not None else 4.0
  min_side = effective_min_side(pre.min_side if pre is not None else DEFAULT_MIN_SIDE, resolution)
  patch_size = int(c.encoder.patch_size)
  if batch_size < 1:
    raise InputError(f"--batch_size must be >= 1, got {batch_size}")
  if limit < 0:
    raise InputError(f"--limit must be >= 0 (0: every image), got {limit}")
  if resolution < 1 or not buckets.buckets_for_resolution(resolution, patch_size, max_ratio):
    raise InputError(f"--resolution {resolution} gives no crop of whole {patch_size}-pixel "
                     "patches: use a positive multiple of it (256, 512, ...)")
  check_stats_output(out, overwrite)
  paths = ae_lib.list_images(images)
  if not paths:
    raise InputError(f"no image files in {', '.join(images)}")
  paths = paths[:limit or None]
  # The batch split over this process's devices, as precompute encodes.
  mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())
  encoder = raw_feature_encoder(c, batch_size, mesh)
  progress = Progress(len(paths), "images", stream or sys.stderr)
  try:
    result = accumulate_image_stats(encoder.encode, paths, resolution, patch_size, batch_size,
                                    max_ratio=max_ratio, min_side=min_side, say=say,
                                    progress=progress)
  finally:
    progress.end_line()
  skipped = f"{len(result.skipped)} skipped"
  if not result.used:
    raise InputError(f"no image could be encoded ({skipped}; the first: "
                     f"{result.skipped[0][0]}: {result.skipped[0][1]})")
  mean, std = result.accumulator.result()
  try:
    LatentStats.from_arrays(mean, std)
  except ValueError as e:  # e.g. a channel constant over too few images
    raise InputError(f"the features of {len(result.used)} images give unusable statistics "
                     f"({e}); use more images") from None
  atomic_files.write(out, lambda tmp: save_latent_stats(tmp, mean, std))
  say(f"statistics of {len(result.used)} images ({result.accumulator.count} tokens, "
      f"{mean.shape[0]} channels, {resolution} px crops), {skipped}, written to {out}")
  if int(c.stats_layer) not in (-1, 0):
    say(f"note: the file has one row; read it with autoencoder.stats_layer=-1 (this config "
        f"has {int(c.stats_layer)})")
  return result
