"""The feature-precomputation job (`launch/precompute.py`'s default config): the `autoencoder`
section (DINOv3 weights, latent statistics) and the `precompute` section (text encoder, resolution,
sharding), both documented in svg_jax/config.py.

  python launch/precompute.py --input data/train.jsonl --out records/ \
      --config.autoencoder.encoder_path=... --config.precompute.text_encoder_dir=gemma-2-2b

`configs/precompute.py:demo` is the demo's job (svg_jax/demo/configs.py): its small random DINOv3
at 64 px, for the files `launch/demo.sh` made, whose records `configs/tiny.py` trains on.
"""
from svg_jax import config
from svg_jax.demo import configs as demo_configs
from svg_jax.input_errors import InputError


def get_config(variant: str = ""):
  if variant == "demo":
    return demo_configs.precompute()
  if variant:
    raise InputError(f"unknown variant {variant!r} of configs/precompute.py (none, or demo)")
  return config.precompute_job_config()
