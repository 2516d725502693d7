"""The demo decoder's input files: shapes images, a random frozen DINOv3, its latent statistics.

`prepare(folder, encoder, resolution, ...)` makes (once; later calls reuse the files) in `folder`:
  shapes_{R}px[_fixed]_seed{S}/  the shapes demo dataset (svg_jax/demo/shapes.py) at R pixels,
  dinov3_random_{tag}.pth a DINOv3 of the `encoder` architecture initialized from seed S, saved as
                          an official state dict and used only through `load_dinov3` (the loader
                          of the real weights),
  latent_stats_{tag}_{R}px.pt  per-channel mean / std of that encoder's features over the training
                          images, in the official statistics format (`write_latent_stats`),
and returns the decoder-config fields that point at them (data.jsonl, data.heldout_jsonl,
autoencoder.encoder_path, autoencoder.stats_path): the trainer reads them like any user's files.
Files are written atomically, so an interrupted run leaves nothing half-written under these names.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from svg_jax.convert.dinov3 import load_dinov3, params_to_official
from svg_jax.convert.torch_pickle import save_torch_file
from svg_jax.data import buckets, image_pipeline
from svg_jax.data.images import imagenet_normalize, open_rgb
from svg_jax.demo import shapes
from svg_jax.latent_stats import write_latent_stats
from svg_jax.models.dinov3 import DINOv3Config, DINOv3ViT
from svg_jax.utils import atomic_files

STATS_IMAGES = 512  # training images the demo statistics are computed on (at most)


def make_random_encoder(path: str, cfg: DINOv3Config, seed: int) -> None:
  """A DINOv3 initialized from `seed`, saved as an official .pth."""
  x = np.zeros((1, cfg.patch_size, cfg.patch_size, cfg.in_channels), np.float32)
  params = jax.jit(lambda k: nn.unbox(DINOv3ViT(cfg).init(k, x)["params"]))(
      jax.random.PRNGKey(seed))
  state = params_to_official(jax.device_get(params), cfg)
  atomic_files.write(path, lambda tmp: save_torch_file(tmp, state))


def _dit_crop(path: str, resolution: int) -> np.ndarray:
  """The square the DiT's precompute encodes (the statistics normalize its latents)."""
  return np.asarray(buckets.center_crop(open_rgb(path)[0], (resolution, resolution)), np.uint8)


def make_stats(path: str, encoder_path: str, cfg: DINOv3Config, jsonl: str, resolution: int
               ) -> None:
  """Raw-feature statistics over the training images."""
  params = load_dinov3(encoder_path, cfg)
  paths = image_pipeline.read_image_list(jsonl)[:STATS_IMAGES]
  encode = jax.jit(lambda p, im: DINOv3ViT(cfg).apply({"params": p}, imagenet_normalize(im)))

  def batches():
    for start in range(0, len(paths), 64):
      images = np.stack([_dit_crop(p, resolution) for p in paths[start:start + 64]])
      yield np.asarray(encode(params, images))

  atomic_files.write(path, lambda tmp: write_latent_stats(tmp, batches()))


def prepare(folder: str, encoder: DINOv3Config, resolution: int, *, num_train: int,
            num_heldout: int, seed: int, layouts: str = "jittered") -> dict[str, str]:
  """Makes the files (see the module docstring); returns {config field: path}."""
  folder = os.path.abspath(folder)
  os.makedirs(folder, exist_ok=True)
  kind = "" if layouts == "jittered" else f"_{layouts}"
  data_dir = os.path.join(folder, f"shapes_{resolution}px{kind}_seed{seed}")
  shapes.write_dataset(data_dir, num_train, num_heldout, resolution, seed, layouts)
  jsonl = os.path.join(data_dir, "train.jsonl")
  tag = f"d{encoder.dim}_l{encoder.depth}_p{encoder.patch_size}_seed{seed}"
  encoder_path = os.path.join(folder, f"dinov3_random_{tag}.pth")
  if not os.path.isfile(encoder_path):
    logging.info("demo: creating the random DINOv3 %s", encoder_path)
    make_random_encoder(encoder_path, encoder, seed)
  stats_path = os.path.join(folder, f"latent_stats_{tag}_{resolution}px.pt")
  if not os.path.isfile(stats_path):
    logging.info("demo: computing latent statistics %s", stats_path)
    make_stats(stats_path, encoder_path, encoder, jsonl, resolution)
  return {"data.jsonl": jsonl, "data.heldout_jsonl": os.path.join(data_dir, "heldout.jsonl"),
          "autoencoder.encoder_path": encoder_path, "autoencoder.stats_path": stats_path}


def prepare_for(config, folder: str, *, num_train: int, num_heldout: int, seed: int,
                layouts: str = "jittered") -> dict[str, str]:
  """`prepare` for a decoder config (its encoder and resolution), then points it at the files."""
  paths = prepare(folder, DINOv3Config.from_dict(config.autoencoder.encoder.to_dict()),
                  int(config.data.resolution), num_train=num_train, num_heldout=num_heldout,
                  seed=seed, layouts=layouts)
  for key, value in paths.items():
    section, field = key.split(".")
    config[section][field] = value
  return paths
