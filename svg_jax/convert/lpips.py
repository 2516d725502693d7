"""The key map of LPIPS (svg_jax/models/lpips.py): torchvision VGG16 + the lpips package's heads.

Two standard files, each given by path:
  vgg: torchvision's VGG16 state dict (`vgg16-397923af.pth`, or any `vgg16().state_dict()`):
       `features.{i}.weight` [O, I, 3, 3] and `.bias` [O] for the 13 convs; `classifier.*` is
       ignored (LPIPS does not use it).
  lin: the lpips package's `weights/v0.1/vgg.pth` (taming-transformers ships the same file):
       `lin{k}.model.1.weight` [1, C_k, 1, 1] for k = 0..4.
Both files were written by old torch versions in the legacy (non-zip) serialization, which the
project's torch-free reader does not parse; those are read with `torch.load(weights_only=True,
map_location="cpu")`. `.safetensors` files with the same keys work too. Missing, unexpected and
mis-shaped keys are errors (svg_jax.convert.errors.KeyMismatchError).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
import safetensors.numpy

from svg_jax.convert import errors, layouts, torch_pickle
from svg_jax.input_errors import MissingInput
from svg_jax.models import lpips as lpips_model

IGNORED_VGG_PREFIXES = ("classifier.",)


def vgg_shapes() -> dict[str, tuple[int, ...]]:
  """Expected torchvision keys -> shapes."""
  out, cin = {}, 3
  for entry in lpips_model.VGG16_LAYOUT:
    if isinstance(entry, str):
      continue
    idx, cout = entry
    out[f"features.{idx}.weight"] = (cout, cin, 3, 3)
    out[f"features.{idx}.bias"] = (cout,)
    cin = cout
  return out


def lin_shapes() -> dict[str, tuple[int, ...]]:
  return {f"lin{k}.model.1.weight": (1, c, 1, 1)
          for k, c in enumerate(lpips_model.TAP_CHANNELS)}


def read_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A flat str -> fp32 numpy dict from a .pth (zip or legacy) or .safetensors file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise MissingInput(f"LPIPS weights {path} do not exist")
  if path.endswith(".safetensors"):
    state = safetensors.numpy.load_file(path)
  else:
    try:
      state = torch_pickle.load_torch_file(path)
    except ValueError as e:
      if "legacy" not in str(e):
        raise
      import torch  # legacy-format files (the published ones) need torch's own reader
      state = {k: v.numpy() for k, v in
               torch.load(path, map_location="cpu", weights_only=True).items()}
  if "state_dict" in state and isinstance(state["state_dict"], Mapping):
    state = state["state_dict"]
  return {k: np.asarray(v, np.float32) for k, v in state.items()}


def _check(what: str, state: Mapping[str, Any], expected: dict[str, tuple[int, ...]],
           ignored: tuple[str, ...] = ()) -> None:
  keys = {k for k in state if not k.startswith(ignored)}
  missing = set(expected) - keys
  unexpected = keys - set(expected)
  misshaped = {f"{k} {tuple(np.shape(state[k]))} != {expected[k]}" for k in keys & set(expected)
               if tuple(np.shape(state[k])) != expected[k]}
  if missing or unexpected or misshaped:
    raise errors.KeyMismatchError(what, missing, unexpected, misshaped, model="LPIPS")


def to_params(vgg_state: Mapping[str, Any], lin_state: Mapping[str, Any],
              what: str = "LPIPS weights") -> dict:
  """torch-layout state dicts -> the `params` of svg_jax.models.lpips.LPIPS."""
  _check(f"{what} (VGG16)", vgg_state, vgg_shapes(), IGNORED_VGG_PREFIXES)
  _check(f"{what} (linear heads)", lin_state, lin_shapes())
  vgg = {}
  for entry in lpips_model.VGG16_LAYOUT:
    if isinstance(entry, str):
      continue
    idx = entry[0]
    w = np.asarray(vgg_state[f"features.{idx}.weight"], np.float32)
    vgg[f"conv_{idx}_kernel"] = layouts.to_flax("conv", w)
    vgg[f"conv_{idx}_bias"] = np.asarray(vgg_state[f"features.{idx}.bias"], np.float32)
  params = {"vgg": vgg}
  for k in range(len(lpips_model.TAP_CHANNELS)):
    params[f"lin_{k}"] = np.asarray(lin_state[f"lin{k}.model.1.weight"], np.float32).reshape(-1)
  return params


def load_lpips(vgg_path: str | os.PathLike, lin_path: str | os.PathLike) -> dict:
  """The LPIPS params from torchvision's VGG16 file and the lpips package's `vgg.pth`."""
  return to_params(read_state(vgg_path), read_state(lin_path),
                   f"LPIPS weights ({os.fspath(vgg_path)}, {os.fspath(lin_path)})")
