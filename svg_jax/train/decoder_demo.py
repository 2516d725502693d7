"""The offline demo of decoder training: shapes images, a random frozen DINOv3, its statistics.

`prepare(config)` makes (once; later calls reuse the files) under `config.data.demo_dir`:
  shapes/            the shapes demo dataset (svg_jax.data.shapes) at `data.resolution` pixels,
  dinov3_random_seed{S}.pth  a DINOv3 of the `autoencoder.encoder` architecture (ViT-S/16+ by
                     default) initialized from `data.demo_seed`, saved as an official state dict and
                     used only through `load_dinov3` (the loader of the real weights),
  latent_stats_seed{S}.pt    per-channel mean / std of that encoder's features over the training
                     images, in the official statistics format (`latent_stats.write_latent_stats`),
and fills the empty paths of the config with them (data.jsonl, data.heldout_jsonl,
autoencoder.encoder_path, autoencoder.stats_path). Files are written atomically, so an interrupted
run leaves nothing half-written under these names.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from svg_jax.convert.dinov3 import load_dinov3, params_to_official
from svg_jax.convert.torch_pickle import save_torch_file
from svg_jax.data import image_pipeline, shapes
from svg_jax.data.images import imagenet_normalize
from svg_jax.latent_stats import write_latent_stats
from svg_jax.models.dinov3 import DINOv3Config, DINOv3ViT

STATS_IMAGES = 512  # training images the demo statistics are computed on (at most)


def _atomic(path: str, write) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  write(tmp)
  os.replace(tmp, path)


def make_random_encoder(path: str, cfg: DINOv3Config, seed: int) -> None:
  """A DINOv3 initialized from `seed`, saved as an official .pth."""
  x = np.zeros((1, cfg.patch_size, cfg.patch_size, cfg.in_channels), np.float32)
  params = jax.jit(lambda k: nn.unbox(DINOv3ViT(cfg).init(k, x)["params"]))(
      jax.random.PRNGKey(seed))
  state = params_to_official(jax.device_get(params), cfg)
  _atomic(path, lambda tmp: save_torch_file(tmp, state))


def make_stats(path: str, encoder_path: str, cfg: DINOv3Config, jsonl: str, resolution: int
               ) -> None:
  """Raw-feature statistics over the training images."""
  params = load_dinov3(encoder_path, cfg)
  paths = image_pipeline.read_image_list(jsonl)[:STATS_IMAGES]
  encode = jax.jit(lambda p, im: DINOv3ViT(cfg).apply({"params": p}, imagenet_normalize(im)))

  def batches():
    for start in range(0, len(paths), 64):
      images = np.stack([image_pipeline.load_crop(p, resolution) for p in paths[start:start + 64]])
      yield np.asarray(encode(params, images))

  _atomic(path, lambda tmp: write_latent_stats(tmp, batches()))


def prepare(config) -> dict[str, str]:
  """Makes the demo files (see the module docstring) and sets the config's empty paths."""
  d, ae = config.data, config.autoencoder
  demo = os.path.abspath(d.demo_dir)
  os.makedirs(demo, exist_ok=True)
  seed, res = int(d.demo_seed), int(d.resolution)
  cfg = DINOv3Config.from_dict(ae.encoder.to_dict())
  data_dir = os.path.join(demo, f"shapes_{res}px_seed{seed}")
  shapes.write_dataset(data_dir, int(d.demo_num_train), int(d.demo_num_heldout), res, seed)
  jsonl = os.path.join(data_dir, "train.jsonl")
  tag = f"d{cfg.dim}_l{cfg.depth}_p{cfg.patch_size}_seed{seed}"
  encoder_path = os.path.join(demo, f"dinov3_random_{tag}.pth")
  if not os.path.isfile(encoder_path):
    logging.info("demo: creating the random DINOv3 %s", encoder_path)
    make_random_encoder(encoder_path, cfg, seed)
  stats_path = os.path.join(demo, f"latent_stats_{tag}_{res}px.pt")
  if not os.path.isfile(stats_path):
    logging.info("demo: computing latent statistics %s", stats_path)
    make_stats(stats_path, encoder_path, cfg, jsonl, res)
  paths = {"data.jsonl": jsonl, "data.heldout_jsonl": os.path.join(data_dir, "heldout.jsonl"),
           "autoencoder.encoder_path": encoder_path, "autoencoder.stats_path": stats_path}
  for key, value in paths.items():
    section, field = key.split(".")
    if not config[section][field]:
      config[section][field] = value
  return paths
