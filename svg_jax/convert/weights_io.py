"""File plumbing shared by the per-model weight converters (dit_io.py, decoder_io.py).

Atomic writes (svg_jax/utils/atomic_files.py: a crash leaves no half file), the `flax` format (a
msgpack file of a params tree, arrays as numpy; or, read only, a training workdir: its run folder
and checkpoint step) and the `diffusers` folder (`config.json` +
`diffusion_pytorch_model.safetensors`, or a sharded index when reading).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import flax
import numpy as np
import safetensors

from svg_jax import checkpoint
from svg_jax.convert import safetensors_io
from svg_jax.input_errors import InputError, MissingInput
from svg_jax.utils import atomic_files

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_CONFIG = "config.json"


FILE_FORMATS = ("official", "safetensors")  # one file; flax and diffusers may be folders


def check_source(path: Path, fmt: str, what: str) -> None:
  """MissingInput for an absent `path`, InputError for a folder where `fmt` reads one file."""
  if not path.exists():
    raise MissingInput(f"{what} checkpoint not found: {path}")
  if fmt in FILE_FORMATS and path.is_dir():
    raise InputError(f"{path} is a folder; the {fmt} format is one file")


def check_destination(path: str | os.PathLike, folder: bool, overwrite: bool) -> None:
  """Refuses a destination that would lose a file: an existing one unless `overwrite`, and a
  folder where a file is written (or a file where a folder is); InputError, one line."""
  path = Path(path)
  if not path.exists() and not path.is_symlink():
    return
  if path.is_dir() != folder:
    raise InputError(f"{path} is {'a file' if folder else 'a folder'}; this format writes "
                     f"{'a folder' if folder else 'a file'} there")
  if not overwrite:
    raise InputError(f"{path} exists; choose another destination or replace it with --overwrite")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
  """`write(tmp)` writes the file at `tmp` (a Path), renamed to `path` when done (see
  svg_jax/utils/atomic_files.py); the folder is created if needed. A writer's error that is the
  file system's (torch.save's RuntimeError, safetensors' own error) is an OSError naming `path`."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with _write_errors_naming(path):
    atomic_files.write(path, lambda tmp: write(Path(tmp)))


@contextlib.contextmanager
def _write_errors_naming(path: Path):
  """torch.save's RuntimeError and safetensors' own error for what the file system refused (a
  full disk's is torch's "unexpected pos ..."), and OSErrors about temporary names: one OSError
  that names `path`."""
  try:
    yield
  except (OSError, RuntimeError, safetensors.SafetensorError) as e:
    raise OSError(f"could not write {path} (a full disk, or no write access?): "
                  f"{' '.join(str(e).split())}") from e


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
    raise InputError(f"{path}: not a Flax msgpack file ({type(e).__name__}: {e})") from None


def training_checkpoint(path: str | os.PathLike, step: int | None,
                        task: str) -> tuple[str, int]:
  """(run folder, step) of a training workdir or of its `checkpoints/` folder: `step`, or the
  latest finished checkpoint. FileNotFoundError naming `path` (and the steps it has) otherwise;
  `task` names the run expected there."""

  path = Path(path)
  if path.name.isdigit() and path.parent.name == checkpoint.SUBDIR:
    raise InputError(f"{path} is one checkpoint's folder: give the run's workdir "
                     f"{path.parent.parent} and step {int(path.name)} (--step)")
  run = path.parent if path.name == checkpoint.SUBDIR else path
  directory = checkpoint.checkpoint_dir(os.fspath(run))
  steps = checkpoint.finished_steps(directory)
  if not steps:
    raise MissingInput(f"{path} holds no finished Orbax checkpoint (expected the workdir of "
                       f"a `task = \"{task}\"` training run)")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise MissingInput(f"{path} has no checkpoint of step {step} (steps: {steps})")
  saved_task = checkpoint.read_saved_config(directory, step).get("task", "dit")
  if saved_task != task:
    raise InputError(f"{path} is a `task = \"{saved_task}\"` training run, not a \"{task}\" one "
                     f"(convert it as --model {saved_task})")
  return os.fspath(run), step


def save_diffusers_folder(path: str | os.PathLike, state: dict[str, np.ndarray],
                          config: dict[str, Any]) -> None:
  """`path/config.json` (indented JSON) and `path/diffusion_pytorch_model.safetensors`, written
  as a whole: into a temporary folder beside `path`, which then replaces `path` (an earlier
  folder there goes, stale shards included: diffusers would read a sharded index before our
  file)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(atomic_files.temp_name(path))
  old = Path(f"{tmp}.old")
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    with _write_errors_naming(path):
      tmp.mkdir()
      atomic_files.write(tmp / DIFFUSERS_WEIGHTS,  # the permissions of a plain file
                         lambda t: safetensors_io.save_safetensors(t, state))
      atomic_files.write_text(tmp / DIFFUSERS_CONFIG, json.dumps(config, indent=2) + "\n")
    if path.is_dir():
      os.replace(path, old)
    try:
      os.replace(tmp, path)
    except BaseException:
      if old.is_dir():  # the earlier folder back where it was
        os.replace(old, path)
      raise
    shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def load_diffusers_folder(path: str | os.PathLike) -> tuple[dict | None, dict[str, np.ndarray]]:
  """(config.json as a dict, or None when absent; the state dict) of a diffusers folder, or of a
  bare `.safetensors` file / sharded index (then no config)."""
  path = Path(path)
  config_file = path / DIFFUSERS_CONFIG
  config = json.loads(config_file.read_text()) if config_file.is_file() else None
  return config, safetensors_io.load_sharded_safetensors(path)
