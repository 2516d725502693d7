"""The folder of a sampling run (launch/sample.py): `{j:05d}.png` per image, `grid.png` of them
all and `metadata.jsonl` (one line per image: file, prompt, seed, size and what decided it).

An earlier run's folder is refused unless it is to be replaced, and replacing removes that run's
images first: a new metadata.jsonl beside stale PNGs of the old run would describe a folder that
is not there.
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np

from svg_jax import generate as gen
from svg_jax.data import jsonl
from svg_jax.input_errors import InputError
from svg_jax.utils import atomic_files

METADATA = "metadata.jsonl"
GRID = "grid.png"


def check_folder(out: str, overwrite: bool) -> None:
  """InputError when `out` holds an earlier run (its metadata.jsonl) and `overwrite` is off."""
  if os.path.exists(os.path.join(out, METADATA)) and not overwrite:
    raise InputError(f"{out} holds an earlier run's images ({METADATA}); choose another output "
                     "folder or replace them with --overwrite")


def _remove_earlier_run(out: str) -> None:
  """The files an earlier run's metadata.jsonl lists, then that file (other files stay)."""
  metadata = os.path.join(out, METADATA)
  if not os.path.exists(metadata):
    return
  for line in jsonl.lines(metadata):
    name = None if line.problem else line.item.get("file")
    if isinstance(name, str):
      earlier = os.path.join(out, os.path.basename(name))
      if os.path.isfile(earlier):
        os.remove(earlier)
  os.remove(metadata)


def write_folder(out: str, images: Sequence[np.ndarray], prompts: Sequence[str],
                 seeds: Sequence[int], provenance: dict, grid_cols: int = 0) -> None:
  """Writes image j with its prompt and seed (all of one size), the grid (`grid_cols` columns;
  0: about the square root) and metadata.jsonl last, replacing an earlier run's folder."""
  if not len(images) == len(prompts) == len(seeds):
    raise ValueError(f"{len(images)} images for {len(prompts)} prompts and {len(seeds)} seeds")
  os.makedirs(out, exist_ok=True)
  _remove_earlier_run(out)
  h, w = np.shape(images[0])[:2]
  lines = []
  for j, (prompt, seed, img) in enumerate(zip(prompts, seeds, images)):
    name = f"{j:05d}.png"
    atomic_files.save_png(os.path.join(out, name), img)
    lines.append(json.dumps(dict(file=name, prompt=prompt, seed=seed, width=w, height=h,
                                 **provenance)))
  cols = grid_cols or math.ceil(math.sqrt(len(images)))
  atomic_files.save_png(os.path.join(out, GRID), gen.make_grid(images, cols))
  atomic_files.write_text(os.path.join(out, METADATA), "\n".join(lines) + "\n")
