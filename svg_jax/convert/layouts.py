"""Torch <-> Flax tensor layouts: the one place every key map takes its transposes from.

  linear   torch `Linear.weight` [out, in]          <-> Flax kernel [in, out]
  conv     torch `Conv2d.weight` [O, I, kh, kw]     <-> Flax kernel [kh, kw, I, O] (HWIO)
  conv1x1  torch 1x1 `Conv2d.weight` [O, I, 1, 1]   <-> Flax Dense kernel [I, O]
  vector   biases, norms, embeddings: unchanged
Results are C-contiguous copies, ready to be written or placed on devices.
"""
from __future__ import annotations

import numpy as np

LAYOUTS = ("linear", "conv", "conv1x1", "vector")


def _check(layout: str) -> None:
  if layout not in LAYOUTS:
    raise ValueError(f"unknown tensor layout {layout!r}; one of {LAYOUTS}")


def to_flax(layout: str, w: np.ndarray) -> np.ndarray:
  """A torch tensor in `layout` -> our Flax parameter."""
  _check(layout)
  w = np.asarray(w)
  if layout == "linear":
    return np.ascontiguousarray(w.T)
  if layout == "conv":
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))
  if layout == "conv1x1":
    return np.ascontiguousarray(w[:, :, 0, 0].T)
  return w


def to_torch(layout: str, w: np.ndarray) -> np.ndarray:
  """Our Flax parameter -> the torch tensor in `layout`."""
  _check(layout)
  w = np.asarray(w)
  if layout == "linear":
    return np.ascontiguousarray(w.T)
  if layout == "conv":
    return np.ascontiguousarray(w.transpose(3, 2, 0, 1))
  if layout == "conv1x1":
    return np.ascontiguousarray(w.T[:, :, None, None])
  return w


def torch_shape(layout: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape of a Flax parameter of `flax_shape` in `layout`."""
  _check(layout)
  s = tuple(flax_shape)
  if layout == "linear":
    return s[::-1]
  if layout == "conv":
    return (s[3], s[2], s[0], s[1])
  if layout == "conv1x1":
    return (s[1], s[0], 1, 1)
  return s
