"""Read and write NextDiT weights in every supported format, through the one key map.

Formats:
  flax         a msgpack file of our params tree (flax.serialization), scanned or not
  official     the official SVG-T2I `consolidated.00-of-01.pth` flat dict (fp32 or bf16)
  safetensors  the official key layout in a single .safetensors file
  diffusers    a `Lumina2Transformer2DModel` folder: config.json + diffusion_pytorch_model.safetensors
               (or a sharded index)
Reading never needs torch and never executes code from a file; writing `official` needs torch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import flax
import numpy as np

from svg_jax.convert import nextdit as keymap
from svg_jax.convert import safetensors_io, torch_pickle
from svg_jax.models.nextdit import NextDiTConfig, abstract_params

FORMATS = ("flax", "official", "safetensors", "diffusers")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _check_format(fmt: str) -> None:
  if fmt not in FORMATS:
    raise ValueError(f"unknown DiT checkpoint format {fmt!r}; choose one of {FORMATS}")


def load_dit(path: str | os.PathLike, fmt: str, cfg: NextDiTConfig) -> dict:
  """Load weights in format `fmt` as fp32 Flax params laid out for `cfg` (scanned or not)."""
  _check_format(fmt)
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"DiT checkpoint not found: {path}")
  if fmt == "flax":
    tree = flax.serialization.msgpack_restore(path.read_bytes())
    return params_from_tree(tree, cfg)
  if fmt == "official":
    state = torch_pickle.load_torch_file(path)
    if isinstance(state, dict) and "model" in state and not any("." in k for k in state):
      state = state["model"]
    return keymap.official_to_params(_flat_arrays(state, path), cfg)
  if fmt == "safetensors":
    return keymap.official_to_params(safetensors_io.load_safetensors(path), cfg)
  config_file = path / "config.json"
  if config_file.exists():
    keymap.check_diffusers_config(json.loads(config_file.read_text()), cfg)
  state = safetensors_io.load_sharded_safetensors(path)
  return keymap.official_to_params(keymap.diffusers_to_official(state, cfg), cfg)


def save_dit(params, path: str | os.PathLike, fmt: str, cfg: NextDiTConfig,
             dtype=np.float32) -> None:
  """Write params in format `fmt`; files appear atomically (written to a temp name, then renamed)."""
  _check_format(fmt)
  path = Path(path)
  if fmt == "flax":
    tree = flax.traverse_util.unflatten_dict(
        {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(
            flax.core.unfreeze(flax.linen.meta.unbox(params))).items()})
    _atomic_write(path, lambda tmp: tmp.write_bytes(flax.serialization.msgpack_serialize(tree)))
    return
  state = keymap.params_to_official(params, cfg, dtype)
  if fmt == "official":
    _atomic_write(path, lambda tmp: torch_pickle.save_torch_file(tmp, state))
  elif fmt == "safetensors":
    _atomic_write(path, lambda tmp: safetensors_io.save_safetensors(tmp, state))
  else:
    path.mkdir(parents=True, exist_ok=True)
    diffusers_state = keymap.official_to_diffusers(state, cfg)
    _atomic_write(path / DIFFUSERS_WEIGHTS,
                  lambda tmp: safetensors_io.save_safetensors(tmp, diffusers_state))
    _atomic_write(path / "config.json", lambda tmp: tmp.write_text(
        json.dumps(keymap.diffusers_config(cfg), indent=2)))


def params_from_tree(tree, cfg: NextDiTConfig) -> dict:
  """A params tree in either layout (scanned / unscanned) -> `cfg`'s layout, checked against it."""
  flat = {k: np.asarray(v, np.float32) for k, v in keymap.unscanned_flat(tree).items()}
  expected = keymap.unscanned_flat(abstract_params(cfg))
  missing = set(expected) - set(flat)
  unexpected = set(flat) - set(expected)
  misshaped = [f"{'/'.join(k)} {flat[k].shape} != {expected[k].shape}"
               for k in set(flat) & set(expected) if flat[k].shape != expected[k].shape]
  if missing or unexpected or misshaped:
    raise keymap.KeyMismatchError("Flax NextDiT params", ["/".join(k) for k in missing],
                                  ["/".join(k) for k in unexpected], misshaped)
  return keymap.rescan(flat, cfg)


def _flat_arrays(state, path) -> dict[str, np.ndarray]:
  bad = [k for k, v in state.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise ValueError(f"{path}: not a flat dict of tensors (entries {bad[:5]} are not tensors)")
  return state


def _atomic_write(path: Path, write) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  write(tmp)
  os.replace(tmp, path)
