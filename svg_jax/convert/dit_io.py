"""Read and write NextDiT weights in every supported format, through the one key map.

Formats:
  flax         read: a `task = "dit"` training workdir (or its `checkpoints/` folder), whose Orbax
               checkpoint of the latest step (or `step`) gives the EMA params (or the raw ones),
               or a msgpack file of our params tree (flax.serialization), scanned or not; written
               as that msgpack file
  official     the official SVG-T2I `consolidated.00-of-01.pth` flat dict (fp32 or bf16)
  safetensors  the official key layout in a single .safetensors file
  diffusers    a `Lumina2Transformer2DModel` folder: config.json + diffusion_pytorch_model.safetensors
               (or a sharded index)
Reading never needs torch and never executes code from a file; writing `official` needs torch.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import numpy as np

from svg_jax import dit_checkpoint
from svg_jax.convert import nextdit as keymap
from svg_jax.convert import safetensors_io, torch_pickle, weights_io
from svg_jax.input_errors import InputError
from svg_jax.models.nextdit import NextDiTConfig, abstract_params

FORMATS = ("flax", "official", "safetensors", "diffusers")


def _check_format(fmt: str) -> None:
  if fmt not in FORMATS:
    raise InputError(f"unknown DiT checkpoint format {fmt!r}; choose one of {FORMATS}")


def load_dit(path: str | os.PathLike, fmt: str, cfg: NextDiTConfig, step: int | None = None,
             ema: bool | None = None) -> dict:
  """Load weights in format `fmt` as fp32 Flax params laid out for `cfg` (scanned or not).

  step, ema: the checkpoint step (default the latest) and EMA (True, the default) or raw params
  of a training workdir (flax only)."""
  _check_format(fmt)
  path = Path(path)
  weights_io.check_source(path, fmt, "DiT")
  workdir = fmt == "flax" and path.is_dir()
  if (step is not None or ema is not None) and not workdir:
    raise ValueError("a step or EMA choice applies to a training workdir only (flax format, a "
                     "folder)")
  if workdir:
    return params_from_tree(_workdir_params(path, cfg, step, ema is not False), cfg)
  if fmt == "flax":
    return params_from_tree(weights_io.load_flax_msgpack(path), cfg)
  if fmt == "official":
    state = torch_pickle.load_torch_file(path)
    if isinstance(state, dict) and "model" in state and not any("." in k for k in state):
      state = state["model"]
    return keymap.official_to_params(_flat_arrays(state, path), cfg)
  if fmt == "safetensors":
    return keymap.official_to_params(safetensors_io.load_safetensors(path), cfg)
  config, state = weights_io.load_diffusers_folder(path)
  if config is not None:
    keymap.check_diffusers_config(config, cfg)
  return keymap.official_to_params(keymap.diffusers_to_official(state, cfg), cfg)


def save_dit(params, path: str | os.PathLike, fmt: str, cfg: NextDiTConfig,
             dtype=np.float32) -> None:
  """Write params in format `fmt`; files appear atomically (written to a temp name, then renamed)."""
  _check_format(fmt)
  path = Path(path)
  if fmt == "flax":
    weights_io.save_flax_msgpack(path, params)
    return
  state = keymap.params_to_official(params, cfg, dtype)
  if fmt == "official":
    weights_io.atomic_write(path, lambda tmp: torch_pickle.save_torch_file(tmp, state))
  elif fmt == "safetensors":
    weights_io.atomic_write(path, lambda tmp: safetensors_io.save_safetensors(tmp, state))
  else:
    weights_io.save_diffusers_folder(path, keymap.official_to_diffusers(state, cfg),
                                     keymap.diffusers_config(cfg))


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


def _workdir_params(workdir: Path, cfg: NextDiTConfig, step: int | None, ema: bool) -> dict:
  """The EMA or raw params of a training run's Orbax checkpoint, on the host, once the model
  config the run saved is the architecture of `cfg` (hardware fields and the layer layout may
  differ: the tree is read in the run's layout and `params_from_tree` converts it)."""
  run, step = weights_io.training_checkpoint(workdir, step, "dit")
  saved = dit_checkpoint.saved_model_config(run, step)
  free = set(dit_checkpoint.HARDWARE_FIELDS) | {"scan_layers"}
  differ = [f"{f.name} (run {getattr(saved, f.name)!r}, config {getattr(cfg, f.name)!r})"
            for f in dataclasses.fields(NextDiTConfig)
            if f.name not in free and getattr(saved, f.name) != getattr(cfg, f.name)]
  if differ:
    raise InputError(f"{workdir} step {step}: the model the run saved differs from the config's "
                     "in " + "; ".join(differ))
  layout = dataclasses.replace(cfg, scan_layers=saved.scan_layers)  # the hardware of `cfg`
  return jax.device_get(dit_checkpoint.load_params(run, layout, ema=ema, step=step))


def _flat_arrays(state, path) -> dict[str, np.ndarray]:
  bad = [k for k, v in state.items() if not isinstance(v, np.ndarray)]
  if bad:
    hint = (" (a Lightning checkpoint, like the SVG autoencoder's .ckpt: a decoder's weights "
            "convert as --model decoder)" if "state_dict" in bad else "")
    raise ValueError(f"{path}: not a flat dict of tensors (entries {bad[:5]} are not tensors)"
                     + hint)
  return state
