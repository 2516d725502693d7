"""Decoder training (`task = "decoder"`): the SVG pixel decoder behind a frozen DINOv3 (docs/reference.md §3.3).

Variants (`--config configs/decoder.py:<variant>`):
  tiny         the CPU demo's (svg_jax/demo/configs.py, its default preset): 64 px images, a
               narrow 4-block DINOv3 with 8 px patches (an 8x8 grid of 128 channels), a small
               decoder; `tiny_full` the same behind a ViT-S+-width encoder (384 channels). Its files (shapes images, a random DINOv3
               made from a seed, its statistics) come from `python launch/make_demo_data.py
               --out DIR --decoder_files`, which prints the four path flags to add here.
  stage1_256   official stage 1: 256 px, batch 64 x 8 GPUs, the released decoder architecture.
  stage2_512   official stage 2: 512 px (the file says 64 per GPU although its name says bs16).
  stage3_1024  official stage 3 (1024 px per its name; batch 3 x 8). Stage 3 officially trains at
               native aspect ratios from a JSONL; here images are squares as in stages 1-2.
Official recipe in every variant: Adam(lr 1e-4, b1 0.5, b2 0.9) for decoder and discriminator,
no gradient clipping, no weight decay, fp32; loss L1 + 1.0 * LPIPS (sum over pixels / batch) +
hinge PatchGAN with the adaptive weight x 0.5 from disc_start = 2500 iterations (the official
5000 counts Lightning global steps, two per iteration). Later stages start from the previous stage's
decoder (`--config.train.init_from=<stage workdir>`); the step counts are not in the official repo.
Set data.jsonl / data.heldout_jsonl (official `{"path": ...}` lines), autoencoder.encoder_path
(stats_path's default is the official statistics), and loss.lpips_vgg_path (torchvision
vgg16-397923af.pth) + loss.lpips_lin_path (the lpips package's weights/v0.1/vgg.pth); without
LPIPS weights training runs without the LPIPS term. The fields and their defaults: `decoder_task_config()` in svg_jax/config.py.
"""
import ml_collections

from svg_jax import config
from svg_jax.input_errors import InputError
from svg_jax.demo import configs as demo_configs


def _official(resolution: int, batch: int) -> ml_collections.ConfigDict:
  c = config.decoder_task_config()
  c.data.resolution = resolution
  c.train.global_batch_size = batch
  c.train.num_steps = 200_000
  return c


VARIANTS = {
    "tiny": demo_configs.decoder,
    "tiny_full": lambda: demo_configs.decoder("full"),
    "stage1_256": lambda: _official(256, 512),
    "stage2_512": lambda: _official(512, 512),
    "stage3_1024": lambda: _official(1024, 24),
}


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise InputError(f"unknown decoder config variant {variant!r}; one of {sorted(VARIANTS)}")
  return VARIANTS[variant]()
