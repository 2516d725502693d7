"""Images for decoder training: a jsonl of image paths -> shuffled, cropped uint8 batches.

Input: the official jsonl layout (one JSON object a line with at least `"path"`; relative paths are
taken from the folder holding the jsonl, as the demo dataset writes them). Every image is decoded
with `svg_jax.data.images.open_rgb` (RGBA on white, P / L / CMYK / 16-bit to RGB) and cropped to
`resolution` x `resolution` as the official decoder training's ImageNet loader (taming's
`ImagePaths`) does: the shorter side resized to `resolution` (albumentations' SmallestMaxSize:
bilinear as cv2.INTER_LINEAR, no antialiasing), then a random square (RandomCrop; training) or the
centred one (CenterCrop; held-out images, and training with `crop="center"`). Batches are
{"image": uint8 [B, R, R, 3]}. (The DiT's records use another crop: `buckets.center_crop`.)

Order: Grain `MapDataset.range(n) -> shuffle(seed) -> repeat -> [process::processes] -> map(load)
-> batch`, so the stream is a pure function of (jsonl, seed) and every process reads its own slice.
A random crop's offsets come from (seed, the element's position in the global stream), so a resumed
run crops as the uninterrupted one did.
Global batch k is elements [k B, (k + 1) B) of the shuffled stream (B the global batch), whatever
the number of processes: process p of P takes those at p, p + P, ... So the iterator's state, the
number of batches read, is one global position: it goes into checkpoints, a resume continues at the
exact next batch, and it resumes on another number of processes too (`set_state_of_processes`;
the global batch must stay the same). An image that cannot be decoded is logged with its path and
replaced by the next good one in the list; `max_bad_in_a_row` bad ones in a row are an error.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

import grain
import numpy as np

from svg_jax.data import jsonl as jsonl_lib
from svg_jax.data.global_position import agreed_position, process_of
from svg_jax.data.images import BadImageError, open_rgb
from svg_jax.input_errors import InputError, MissingInput

log = logging.getLogger(__name__)

CROPS = ("random", "center")


@dataclasses.dataclass(frozen=True)
class ImagePipelineConfig:
  per_process_batch_size: int
  resolution: int
  seed: int = 0
  num_threads: int = 2
  prefetch_buffer_size: int = 2
  crop: str = "random"
  max_bad_in_a_row: int = 64  # consecutive unreadable images tolerated before giving up

  def validate(self) -> None:
    problems = []
    if self.max_bad_in_a_row < 1:
      problems.append(f"max_bad_in_a_row {self.max_bad_in_a_row} < 1")
    if self.crop not in CROPS:
      problems.append(f"crop {self.crop!r} is not one of {CROPS}")
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


def _linear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """cv2.INTER_LINEAR's two source pixels per output pixel and the second one's weight: pixel
  centres aligned (x_in = (x_out + 0.5) * in / out - 0.5), clamped to the edge."""
  x = np.clip((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0, size_in - 1)
  low = np.floor(x).astype(np.int64)
  return low, np.minimum(low + 1, size_in - 1), (x - low).astype(np.float32)[:, None]


def shorter_side_to(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] with its shorter side resized to `size` (the other rounded to the aspect
  ratio), bilinear without antialiasing: albumentations' SmallestMaxSize within 1 level (cv2's
  fixed-point sums round down about 1 value in 8 that this rounds up)."""
  h, w = image.shape[:2]
  scale = size / min(h, w)
  if scale == 1.0:
    return image
  out_h, out_w = round(h * scale), round(w * scale)
  x = image.astype(np.float32)
  top, bottom, fy = _linear_taps(h, out_h)
  x = x[top] * (1 - fy[:, :, None]) + x[bottom] * fy[:, :, None]
  left, right, fx = _linear_taps(w, out_w)
  x = x[:, left] * (1 - fx) + x[:, right] * fx
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def crop_offsets(height: int, width: int, size: int, rng: np.random.Generator | None
                 ) -> tuple[int, int]:
  """(top, left) of the size x size square: albumentations' RandomCrop from two uniform draws
  (int((H - size + 1) * u)), or its CenterCrop ((H - size) // 2) without `rng`."""
  if rng is None:
    return (height - size) // 2, (width - size) // 2
  u, v = rng.random(2)
  return int((height - size + 1) * u), int((width - size + 1) * v)


def load_square(path: str, resolution: int, rng: np.random.Generator | None = None
                ) -> np.ndarray:
  """One image -> uint8 [resolution, resolution, 3]: the shorter side to `resolution`, then a
  random square (from `rng`) or the centred one."""
  image, _ = open_rgb(path)
  resized = shorter_side_to(np.asarray(image, np.uint8).reshape(image.height, image.width, 3),
                            resolution)
  top, left = crop_offsets(resized.shape[0], resized.shape[1], resolution, rng)
  return resized[top:top + resolution, left:left + resolution]


class _Loader:
  """(stream position, index) -> cropped image; a bad image is replaced by the next good one."""

  def __init__(self, paths: Sequence[str], config: ImagePipelineConfig):
    self.paths, self.resolution, self.crop = list(paths), config.resolution, config.crop
    self.seed, self.max_bad = int(config.seed), config.max_bad_in_a_row

  def __call__(self, position_and_index: tuple[int, int]) -> np.ndarray:
    position, index = position_and_index
    n = len(self.paths)
    # A replacement image is cropped with the offsets the bad one would have had.
    rng = np.random.default_rng([self.seed, int(position)]) if self.crop == "random" else None
    for j in range(min(self.max_bad, n)):
      path = self.paths[(int(index) + j) % n]
      try:
        return load_square(path, self.resolution, rng)
      except (BadImageError, OSError) as e:
        log.error("bad image %s (%s): using the next one", path, e)
    raise ValueError(f"{min(self.max_bad, n)} consecutive images from index {index} are "
                     "unreadable (data.max_bad_in_a_row)")


def _with_position(position: int, index: int) -> tuple[int, int]:
  return position, index


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
        .map_with_index(_with_position)  # before the slice: the position in the global stream
        [process_index::process_count]
        .map(_Loader(paths, config))
        .batch(config.per_process_batch_size, drop_remainder=True, batch_fn=_collate))
  return ImageIterator(iter(ds.to_iter_dataset(grain.ReadOptions(
      num_threads=config.num_threads, prefetch_buffer_size=config.prefetch_buffer_size))))


def load_eval_images(jsonl: str | os.PathLike, resolution: int, count: int) -> np.ndarray:
  """The first `count` images of a jsonl (in file order), centre squares: uint8 [count, R, R, 3]."""
  paths = read_image_list(jsonl)
  if count > len(paths):
    raise InputError(f"{jsonl} lists {len(paths)} images, fewer than the {count} asked for")
  return np.stack([load_square(p, resolution) for p in paths[:count]])
