"""Rounding a size up to a multiple: a caption length to the pad multiple or a bucket, a chunk of
rows to the batch split of a mesh, a kernel's length to its lanes."""
from __future__ import annotations

import numpy as np


def round_up(n, multiple: int):
  """The smallest multiple of `multiple` >= n: an int for an int, an array for an array."""
  out = -(-np.asarray(n) // multiple) * multiple
  return int(out) if out.ndim == 0 else out
