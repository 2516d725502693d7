"""Images for decoder training: a jsonl of image paths -> shuffled, center-cropped uint8 batches.

Input: the official jsonl layout (one JSON object a line with at least `"path"`; relative paths are
taken from the folder holding the jsonl, as the demo dataset writes them). Every image is decoded
with `svg_jax.data.images.open_rgb` (RGBA on white, P / L / CMYK / 16-bit to RGB) and center-cropped
to `resolution` x `resolution` with the official procedure (`buckets.center_crop`: BOX halvings,
BICUBIC cover-resize, centred cut). Batches are {"image": uint8 [B, R, R, 3]}.

Order: Grain `MapDataset.range(n) -> shuffle(seed) -> repeat -> [process::processes] -> map(load)
-> batch`, so the stream is a pure function of (jsonl, seed) and every process reads its own slice.
Global batch k is elements [k B, (k + 1) B) of the shuffled stream (B the global batch), whatever
the number of processes: process p of P takes those at p, p + P, ... So the iterator's state, the
number of batches read, is one global position: it goes into checkpoints, a resume continues at the
exact next batch, and it resumes on another number of processes too (`set_state_of_processes`;
the global batch must stay the same). An image that cannot be decoded is logged with its path and
replaced by the next good one in the list; 64 bad ones in a row are an error.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

import grain
import numpy as np

from svg_jax.data import buckets
from svg_jax.data import jsonl as jsonl_lib
from svg_jax.data.global_position import agreed_position, process_of
from svg_jax.data.images import BadImageError, open_rgb
from svg_jax.input_errors import InputError, MissingInput

log = logging.getLogger(__name__)

MAX_REPLACEMENTS = 64  # consecutive bad images tolerated before giving up


@dataclasses.dataclass(frozen=True)
class ImagePipelineConfig:
  per_process_batch_size: int
  resolution: int
  seed: int = 0
  num_threads: int = 2
  prefetch_buffer_size: int = 2

  def validate(self) -> None:
    problems = []
    if self.per_process_batch_size < 1:
      problems.append(f"per-process batch size {self.per_process_batch_size} < 1")
    if self.resolution < 1:
      problems.append(f"resolution {self.resolution} < 1")
    if problems:
      raise ValueError("; ".join(problems))


def read_image_list(jsonl: str | os.PathLike) -> list[str]:
  """The image paths of a jsonl (absolute; relative ones resolved against the jsonl's folder)."""
  jsonl = os.fspath(jsonl)
  if not os.path.isfile(jsonl):
    raise MissingInput(f"image list {jsonl} does not exist")
  base = os.path.dirname(os.path.abspath(jsonl))
  out = []
  for line in jsonl_lib.lines(jsonl):
    if line.problem:
      raise InputError(f"{jsonl}:{line.number} is {line.problem}")
    if "path" not in line.item:
      raise InputError(f"{jsonl}:{line.number} has no \"path\"")
    out.append(os.path.join(base, line.item["path"]))
  if not out:
    raise InputError(f"{jsonl} lists no images")
  return out


def load_crop(path: str, resolution: int) -> np.ndarray:
  """One image -> uint8 [resolution, resolution, 3] (official center crop)."""
  image, _ = open_rgb(path)
  crop = buckets.center_crop(image, (resolution, resolution))
  return np.asarray(crop, np.uint8).reshape(resolution, resolution, 3)


class _Loader:
  """index -> cropped image; a bad image is replaced by the next good one."""

  def __init__(self, paths: Sequence[str], resolution: int):
    self.paths, self.resolution = list(paths), resolution

  def __call__(self, index: int) -> np.ndarray:
    n = len(self.paths)
    for j in range(min(MAX_REPLACEMENTS, n)):
      path = self.paths[(int(index) + j) % n]
      try:
        return load_crop(path, self.resolution)
      except (BadImageError, OSError) as e:
        log.error("bad image %s (%s): using the next one", path, e)
    raise ValueError(f"{MAX_REPLACEMENTS} consecutive images from index {index} are unreadable")


def _collate(items: Sequence[np.ndarray]) -> dict:
  return {"image": np.stack(items)}


class ImageIterator:
  """The Grain iterator of one process, resumable from the states of any process count."""

  def __init__(self, grain_iterator):
    self._it = grain_iterator

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._it)

  def get_state(self) -> dict:
    return self._it.get_state()

  def set_state(self, state: dict) -> None:
    self._it.set_state(state)

  def set_state_of_processes(self, states: Sequence[dict], process_index: int) -> None:
    """Resumes from the states P processes saved: every one holds the same global position."""
    del process_index  # the position is global; each process reads its own slice from it
    self._it.set_state(agreed_position(states, "image-loader"))

  def start_prefetch(self) -> None:
    getattr(self._it, "start_prefetch", lambda: None)()

  def close(self) -> None:
    getattr(self._it, "close", lambda: None)()


def make_image_pipeline(jsonl: str | os.PathLike, config: ImagePipelineConfig, *,
                        process_index: int | None = None, process_count: int | None = None
                        ) -> ImageIterator:
  """The training iterator (see the module docstring)."""
  config.validate()
  process_index, process_count = process_of(process_index, process_count)
  paths = read_image_list(jsonl)
  ds = (grain.MapDataset.range(len(paths))
        .shuffle(seed=int(config.seed))
        .repeat()
        [process_index::process_count]
        .map(_Loader(paths, config.resolution))
        .batch(config.per_process_batch_size, drop_remainder=True, batch_fn=_collate))
  return ImageIterator(iter(ds.to_iter_dataset(grain.ReadOptions(
      num_threads=config.num_threads, prefetch_buffer_size=config.prefetch_buffer_size))))


def load_eval_images(jsonl: str | os.PathLike, resolution: int, count: int) -> np.ndarray:
  """The first `count` images of a jsonl (in file order), cropped: uint8 [count, R, R, 3]."""
  paths = read_image_list(jsonl)
  if count > len(paths):
    raise InputError(f"{jsonl} lists {len(paths)} images, fewer than the {count} asked for")
  return np.stack([load_crop(p, resolution) for p in paths[:count]])
