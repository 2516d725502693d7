"""CPU-sized DiT: the embedded default that trains on 2 CPU cores in minutes.

Usage: python launch/train.py --config configs/tiny.py [--config.train.num_steps=200]
The demo's DiT (svg_jax/demo/configs.py; launch/demo.py trains it on the demo's records).
"""
from svg_jax.demo import configs


def get_config():
  return configs.dit()
