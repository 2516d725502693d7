"""File plumbing shared by the per-model weight converters (dit_io.py, decoder_io.py).

Atomic writes (svg_jax/utils/atomic_files.py: a crash leaves no half file), the `flax` format (a
msgpack file of a params tree, arrays as numpy; or, read only, a training workdir: its run folder
and checkpoint step) and the `diffusers` folder (`config.json` +
`diffusion_pytorch_model.safetensors`, or a sharded index when reading).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import flax
import numpy as np

from svg_jax import checkpoint
from svg_jax.convert import safetensors_io
from svg_jax.input_errors import MissingInput
from svg_jax.utils import atomic_files

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_CONFIG = "config.json"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
  """`write(tmp)` writes the file at `tmp` (a Path), renamed to `path` when done (see
  svg_jax/utils/atomic_files.py); the folder is created if needed."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  atomic_files.write(path, lambda tmp: write(Path(tmp)))


def save_flax_msgpack(path: str | os.PathLike, params: Any) -> None:
  """A params tree (boxed or not, jax or numpy leaves) as a msgpack file of numpy arrays."""
  tree = flax.traverse_util.unflatten_dict(
      {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(
          flax.core.unfreeze(flax.linen.meta.unbox(params))).items()})
  atomic_write(path, lambda tmp: tmp.write_bytes(flax.serialization.msgpack_serialize(tree)))


def load_flax_msgpack(path: str | os.PathLike) -> dict:
  """The tree of a msgpack file written by `save_flax_msgpack` (or flax.serialization)."""
  path = Path(path)
  if not path.is_file():
    raise MissingInput(f"Flax msgpack file not found: {path}")
  try:
    return flax.serialization.msgpack_restore(path.read_bytes())
  except Exception as e:  # msgpack raises several unrelated types for a file that is not msgpack
    raise ValueError(f"{path}: not a Flax msgpack file ({type(e).__name__}: {e})") from None


def training_checkpoint(path: str | os.PathLike, step: int | None,
                        task: str) -> tuple[str, int]:
  """(run folder, step) of a training workdir or of its `checkpoints/` folder: `step`, or the
  latest finished checkpoint. FileNotFoundError naming `path` (and the steps it has) otherwise;
  `task` names the run expected there."""

  path = Path(path)
  run = path.parent if path.name == checkpoint.SUBDIR else path
  ckpt = checkpoint.Checkpointer(os.fspath(run), read_only=True)
  try:
    steps = sorted(ckpt.all_steps())
  finally:
    ckpt.close()
  if not steps:
    raise MissingInput(f"{path} holds no finished Orbax checkpoint (expected the workdir of "
                            f"a `task = \"{task}\"` training run)")
  if step is None:
    return os.fspath(run), steps[-1]
  if step not in steps:
    raise MissingInput(f"{path} has no checkpoint of step {step} (steps: {steps})")
  return os.fspath(run), step


def save_diffusers_folder(path: str | os.PathLike, state: dict[str, np.ndarray],
                          config: dict[str, Any]) -> None:
  """`path/config.json` (indented JSON) and `path/diffusion_pytorch_model.safetensors`."""
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  atomic_write(path / DIFFUSERS_WEIGHTS, lambda tmp: safetensors_io.save_safetensors(tmp, state))
  atomic_write(path / DIFFUSERS_CONFIG,
               lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))


def load_diffusers_folder(path: str | os.PathLike) -> tuple[dict | None, dict[str, np.ndarray]]:
  """(config.json as a dict, or None when absent; the state dict) of a diffusers folder, or of a
  bare `.safetensors` file / sharded index (then no config)."""
  path = Path(path)
  config_file = path / DIFFUSERS_CONFIG
  config = json.loads(config_file.read_text()) if config_file.is_file() else None
  return config, safetensors_io.load_sharded_safetensors(path)
