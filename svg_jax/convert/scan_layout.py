"""Scanned layer stacks <-> per-layer entries of a flat params dict, for every converter.

A scanned stack lives at `stack` (e.g. ("layers", "block")) with a leading layer axis; unscanned,
layer i lives at f"{prefix}_{i}". Key maps are written against the unscanned layout.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import numpy as np


def unscan(params, stack: tuple[str, str], prefix: str) -> dict[tuple, Any]:
  """Flatten params to {path: leaf}, splitting a scanned stack into `{prefix}_{i}` entries (as many
  as the stack holds, so a stack of the wrong depth shows up as missing/unexpected keys)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(flax.linen.meta.unbox(params)))
  out = {}
  for path, leaf in flat.items():
    if path[:2] == stack:
      for i in range(leaf.shape[0]):
        out[(f"{prefix}_{i}",) + path[2:]] = (
            jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
            if isinstance(leaf, jax.ShapeDtypeStruct) else leaf[i])
    else:
      out[path] = leaf
  return out


def rescan(flat: dict[tuple, np.ndarray], stack: tuple[str, str], prefix: str, num_layers: int,
           scanned: bool) -> dict:
  """Inverse of `unscan` for a model with `num_layers` layers, scanned or not; returns the tree."""
  if scanned:
    for path in [p for p in flat if p[0] == f"{prefix}_0"]:
      flat[stack + path[1:]] = np.stack(
          [flat.pop((f"{prefix}_{i}",) + path[1:]) for i in range(num_layers)])
  return flax.traverse_util.unflatten_dict(flat)
