"""svg-jax: a JAX/Flax reimplementation of SVG-T2I (text-to-image diffusion in DINOv3 feature space)."""
from setuptools import find_packages, setup

# Exact pins: a fresh install must resolve the stack the tests and benchmarks were measured on.
RUNTIME = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array-record==0.8.6",
    "ml-collections==1.1.0",
    "clu==0.0.12",
    "numpy>=2.0,<2.5",
    "ml-dtypes>=0.5",
    "msgpack>=1.0",
    "safetensors>=0.4,<0.9",
    "pillow>=10",
    "tensorboardX==2.6.5",
    "absl-py>=2.0",
    "sentencepiece==0.2.3",
    "tokenizers>=0.22,<0.24",
    "transformers>=5.0,<6",  # tokenizers of real Gemma folders and the demo tokenizer (svg_jax/text.py)
]
TEST = [
    "pytest>=8",
    "torch==2.13.0",
    "scikit-image==0.26.0",  # SSIM reference
    "tensorflow-datasets==4.9.10",  # tfds mock data for the precompute reader (no TensorFlow needed)
    "scipy", "tqdm",  # needed by the lpips package, installed with --no-deps by launch/env.sh
    "diffusers>=0.42,<0.43",
]

setup(
    name="svg-jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["svg_jax", "svg_jax.*"]),
    install_requires=RUNTIME,
    extras_require={"test": TEST},
)
