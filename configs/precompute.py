"""The feature-precomputation job (`launch/precompute.py`'s default config): the `autoencoder`
section (DINOv3 weights, latent statistics) and the `precompute` section (text encoder, resolution,
sharding), both documented in svg_jax/config.py.

  python launch/precompute.py --input data/train.jsonl --out records/ \
      --config.autoencoder.encoder_path=... --config.precompute.text_encoder_dir=gemma-2-2b
"""
from svg_jax import config


def get_config():
  return config.precompute_job_config()
