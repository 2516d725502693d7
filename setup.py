"""svg-jax: a JAX/Flax reimplementation of SVG-T2I (text-to-image diffusion in DINOv3 feature space)."""
from setuptools import find_packages, setup

# Compatible ranges: upper bounds stop at the next release line that may break the code; lower
# bounds are the newest releases that still ship for Python 3.10 (jax 0.6, flax 0.10, orbax 0.11,
# grain 0.2.13; docs/design_notes.md says what was run on them). The exact versions the tests and benchmarks were measured with are in
# constraints.txt (`pip install -e ".[test]" -c constraints.txt`; launch/env.sh and CI use it).
RUNTIME = [
    "jax>=0.6.2,<0.12",
    "jaxlib>=0.6.2,<0.12",
    "flax>=0.10.7,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.11.30,<0.13",
    "grain>=0.2.13,<0.3",
    "array-record>=0.8.1,<0.9",
    "ml-collections>=1.1,<2",
    "clu>=0.0.12,<0.1",
    "numpy>=2.0,<3",
    "ml-dtypes>=0.5",
    "msgpack>=1.0,<2",
    "safetensors>=0.4,<0.9",
    "pillow>=10",
    "tensorboardX>=2.6,<3",
    "absl-py>=2.0,<3",
    "filelock>=3.12,<5",  # JAX's compilation cache evicts with it (svg_jax/compile_cache.py)
    "sentencepiece>=0.2,<0.3",
    "tokenizers>=0.22,<0.24",
    "transformers>=5.0,<6",  # tokenizers of real Gemma folders and the demo tokenizer (svg_jax/text.py)
]
TEST = [
    "pytest>=8",
    "pytest-xdist>=3.5",  # launch/test.sh runs the tests that may share the cores on workers
    "pytest-timeout>=2.3",  # pytest.ini's limit: a hung test fails instead of holding the suite
    "torch==2.13.0",  # the reference implementations run on its CPU build
    "jax[tpu]",  # libtpu: XLA:TPU compiles of the train step for TPU topologies, on any host
    "scikit-image>=0.25",  # SSIM reference
    "albumentations>=2",  # the official decoder loader's resize and crops (taming's ImagePaths)
    "tensorflow-datasets>=4.9",  # tfds mock data for the precompute reader (no TensorFlow needed)
    # needed by the lpips and taming-transformers packages, installed with --no-deps by
    # launch/env.sh
    "scipy", "tqdm", "requests",
    "diffusers>=0.42,<0.43; python_version >= '3.11'",
    "diffusers>=0.41,<0.42; python_version < '3.11'",  # the newest diffusers for Python 3.10
    "tensorboard>=2.16",  # reads back the trainer's event files (tests/test_validation.py)
    "vermin>=1.6",  # the minimum Python version of the source (tests/test_repo_hygiene.py)
]

setup(
    name="svg-jax",
    version="0.1.0",
    description=__doc__,
    license="Apache-2.0",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["svg_jax", "svg_jax.*"]),
    package_data={"svg_jax.assets": ["*.pt", "prompts/*.jsonl"]},
    install_requires=RUNTIME,
    extras_require={
        "test": TEST,
        "tpu": ["jax[tpu]"],  # Cloud TPU VMs: `pip install -e ".[tpu]"`
        "cuda": ["jax[cuda12]"],  # NVIDIA GPUs, CUDA 12 wheels
        "cuda13": ["jax[cuda13]"],  # NVIDIA GPUs, CUDA 13 wheels
    },
)
