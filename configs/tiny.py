"""CPU-sized DiT: the embedded default that trains on 2 CPU cores in minutes.

Usage: python launch/train.py --config configs/tiny.py[:full] [--config.train.num_steps=200]
The demo's DiT (svg_jax/demo/configs.py; launch/demo.py trains it on the demo's records): the
default `small` preset learns a 128-channel latent of a narrow random DINOv3; `full` is the
ViT-S+-width latent (384 channels) and a 16.7M DiT.
"""
from svg_jax.demo import configs


def get_config(preset: str = configs.DEFAULT_PRESET):
  return configs.dit(preset)
