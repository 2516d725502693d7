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
is to be replaced or resumed. Replacing removes that run's images and grid first, once the new
run's first batch is there to be written: a new metadata.jsonl beside stale PNGs of the old run
would describe a folder that is not there. Resuming keeps the images of the same job (the same
provenance, prompt and seed per image) that are listed and whole, and the run makes the rest; a
folder of another job is refused, not mixed.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Sequence

import numpy as np

from svg_jax.data import jsonl
from svg_jax.input_errors import InputError
from svg_jax.utils import atomic_files

METADATA = "metadata.jsonl"
GRID = "grid.png"
GRID_MAX_IMAGES = 64


def check_folder(out: str, overwrite: bool, resume: bool = False) -> None:
  """InputError when `out` holds an earlier run (its metadata.jsonl) and neither `overwrite` nor
  `resume` is on."""
  if os.path.exists(os.path.join(out, METADATA)) and not (overwrite or resume):
    raise InputError(f"{out} holds an earlier run's images ({METADATA}); choose another output "
                     "folder, go on with it with --resume (the same prompts and settings) or "
                     "replace them with --overwrite")


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


_IMAGE_NAME = re.compile(r"^(\d{5,})\.png$")


def _kept_lines(out: str, provenance: dict, fields: Sequence[dict]) -> dict[int, str]:
  """{j: metadata line} of the images an earlier run of this job left in `out`: listed in its
  metadata.jsonl and whole. InputError when a line is unreadable, or when its run's provenance
  or an image's own fields differ from this job's (`fields[j]` of image j)."""
  metadata = os.path.join(out, METADATA)
  if not os.path.exists(metadata):
    return {}
  want = json.loads(json.dumps(provenance))  # as read back: tuples become lists
  kept = {}
  for line in jsonl.lines(metadata):
    item = None if line.problem else line.item
    match = _IMAGE_NAME.match(str(item.get("file", ""))) if isinstance(item, dict) else None
    if match is None:
      raise InputError(f"{metadata} line {line.number} is not an image's line of this tool "
                       f"({line.problem or 'no file name'}): the folder cannot be resumed; "
                       "choose another output folder or replace it with --overwrite")
    j = int(match.group(1))
    if j >= len(fields):
      raise InputError(f"{out} holds image {item['file']}, past this job's {len(fields)} "
                       "images: it was made from other prompts; choose another output folder or "
                       "replace it with --overwrite")
    expected = {**want, **json.loads(json.dumps(fields[j]))}
    differ = [k for k in sorted(expected) if item.get(k) != expected[k]]
    if differ:
      raise InputError(f"{out} holds images of another job ({item['file']}: "
                       + "; ".join(f"{k}: {item.get(k)!r} there, {expected[k]!r} now"
                                   for k in differ[:3])
                       + "); use the same prompts and settings to resume it, another output "
                       "folder, or --overwrite")
    if atomic_files.whole_png(os.path.join(out, item["file"])):
      kept[j] = json.dumps(item)  # as `add` wrote it
  return kept


class SampleFolder:
  """One run's images written into `out` as they come: `add` per batch, then `finish`.

  provenance: what, besides each image's own fields, decided the images (sampler settings,
  files read); every metadata line carries it.
  """

  def __init__(self, out: str, provenance: dict, resume_fields: Sequence[dict] | None = None):
    """With `resume_fields` (for each image of the whole job, the fields of its metadata line
    besides file and provenance: its own fields as `add` takes them, width and height), the
    images of this job already in `out` are kept: `done` holds their indices, and
    metadata.jsonl is rewritten to list only them (a cut or missing PNG is made again)."""
    self.out, self.provenance = out, dict(provenance)
    self.written: list[str] = []  # file names
    self.done: set[int] = set()
    self._started = False
    if resume_fields is not None:
      kept = _kept_lines(out, self.provenance, resume_fields)
      if kept or os.path.exists(os.path.join(out, METADATA)):
        atomic_files.write_text(os.path.join(out, METADATA),
                                "".join(kept[j] + "\n" for j in sorted(kept)))
        self._started = True  # nothing of the earlier run is removed
      self.done = set(kept)
      self.written = [image_name(j) for j in sorted(kept)]

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
      atomic_files.append_whole(os.path.join(self.out, METADATA),
                                "".join(line + "\n" for line in lines))
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
    for i, name in enumerate(sorted(self.written)):  # in image order, resumed ones included
      img = _read_png(os.path.join(self.out, name))
      if grid is None:  # as generate.make_grid: row-major, empty cells of the last row black
        h, w = img.shape[:2]
        grid = np.zeros((-(-n // cols) * h, cols * w, 3), np.uint8)
      r, q = divmod(i, cols)
      grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    atomic_files.save_png(os.path.join(self.out, GRID), grid)
    return True


def _read_png(path: str) -> np.ndarray:
  from PIL import Image

  with Image.open(path) as img:
    return np.asarray(img.convert("RGB"))
