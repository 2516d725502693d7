"""The folder of a sampling run (launch/sample.py): `{j:05d}.png` per image, `metadata.jsonl` (one
line per image: file, prompt, seed, size, caption tokens and what decided it) and `grid.png` of
them all.

`SampleFolder` writes the images batch by batch as they are decoded: a batch's PNGs appear whole
(written under a temporary name, then renamed), then its metadata lines are appended in one write.
So memory holds one batch whatever the number of images, and an interrupted run (Ctrl-C, out of
memory) keeps every image written before, each listed in metadata.jsonl and none listed that is
not there. grid.png comes last, read back from the written PNGs, and only for up to
GRID_MAX_IMAGES images: a 400-image grid of 256 px images was a 59 MB PNG, 1000 images at 1024 px
would be a 3 GB array.

An earlier run's folder (one with a metadata.jsonl, finished or interrupted) is refused unless it
is to be replaced, and replacing removes that run's images and grid first, once the new run's
first batch is there to be written: a new metadata.jsonl beside stale PNGs of the old run would
describe a folder that is not there.
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np

from svg_jax.data import jsonl
from svg_jax.input_errors import InputError
from svg_jax.utils import atomic_files

METADATA = "metadata.jsonl"
GRID = "grid.png"
GRID_MAX_IMAGES = 64


def check_folder(out: str, overwrite: bool) -> None:
  """InputError when `out` holds an earlier run (its metadata.jsonl) and `overwrite` is off."""
  if os.path.exists(os.path.join(out, METADATA)) and not overwrite:
    raise InputError(f"{out} holds an earlier run's images ({METADATA}); choose another output "
                     "folder or replace them with --overwrite")


def _remove_earlier_run(out: str) -> None:
  """The files an earlier run's metadata.jsonl lists, its grid, then that file (other files
  stay)."""
  metadata = os.path.join(out, METADATA)
  if not os.path.exists(metadata):
    return
  for line in jsonl.lines(metadata):
    name = None if line.problem else line.item.get("file")
    if isinstance(name, str):
      earlier = os.path.join(out, os.path.basename(name))
      if os.path.isfile(earlier):
        os.remove(earlier)
  # A grid of the earlier run would otherwise stay beside a new run too long to get one.
  grid = os.path.join(out, GRID)
  if os.path.isfile(grid):
    os.remove(grid)
  os.remove(metadata)


def image_name(j: int) -> str:
  return f"{j:05d}.png"


class SampleFolder:
  """One run's images written into `out` as they come: `add` per batch, then `finish`.

  provenance: what, besides each image's own fields, decided the images (sampler settings,
  files read); every metadata line carries it.
  """

  def __init__(self, out: str, provenance: dict):
    self.out, self.provenance = out, dict(provenance)
    self.written: list[str] = []  # file names, in order
    self._started = False

  def add(self, indices: Sequence[int], images: np.ndarray | Sequence[np.ndarray],
          fields: Sequence[dict]) -> None:
    """Writes image indices[b] = images[b] (uint8 [H, W, 3]) as `{j:05d}.png`, then its metadata
    line: file, fields[b] (prompt, seed, ...), width, height and the provenance. The first call
    replaces an earlier run's folder. On an error (or Ctrl-C) the batch's PNGs written so far are
    removed before it goes on: every PNG of the run is listed in metadata.jsonl."""
    if not len(indices) == len(images) == len(fields):
      raise ValueError(f"{len(images)} images for {len(indices)} indices and {len(fields)} "
                       "metadata records")
    if not self._started:
      os.makedirs(self.out, exist_ok=True)
      _remove_earlier_run(self.out)
      self._started = True
    names, lines = [], []
    try:
      for j, img, own in zip(indices, images, fields):
        h, w = np.shape(img)[:2]
        name = image_name(j)
        atomic_files.save_png(os.path.join(self.out, name), img)
        names.append(name)
        lines.append(json.dumps(dict(file=name, **own, width=w, height=h, **self.provenance)))
      _append(os.path.join(self.out, METADATA), "".join(line + "\n" for line in lines))
    except BaseException:
      for name in names:
        os.remove(os.path.join(self.out, name))
      raise
    self.written += names

  def finish(self, grid_cols: int = 0) -> bool:
    """Writes grid.png of the written images (`grid_cols` columns; 0: about the square root),
    read back from their PNGs; False, writing nothing, above GRID_MAX_IMAGES images."""
    n = len(self.written)
    if n == 0 or n > GRID_MAX_IMAGES:
      return False
    cols = min(grid_cols or math.ceil(math.sqrt(n)), n)
    grid = None
    for i, name in enumerate(self.written):
      img = _read_png(os.path.join(self.out, name))
      if grid is None:  # as generate.make_grid: row-major, empty cells of the last row black
        h, w = img.shape[:2]
        grid = np.zeros((-(-n // cols) * h, cols * w, 3), np.uint8)
      r, q = divmod(i, cols)
      grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    atomic_files.save_png(os.path.join(self.out, GRID), grid)
    return True


def _append(path: str, text: str) -> None:
  """`text` appended to `path` by one write call (a loop only if the system writes less): a
  killed process leaves whole lines."""
  data = text.encode("utf-8")
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
  try:
    while data:
      data = data[os.write(fd, data):]
  finally:
    os.close(fd)


def _read_png(path: str) -> np.ndarray:
  from PIL import Image

  with Image.open(path) as img:
    return np.asarray(img.convert("RGB"))
