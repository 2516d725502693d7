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
the global batch must stay the same). The state also holds what the position means (a fingerprint
of the image list, the global batch, the seed, the worker count): a state saved under others is
refused (`LoaderStateMismatch`, naming the fields); a state of the first format (`{"next_index": k}`
alone) resumes with a warning, unchecked.

Bad images are counted and reported, never silently dropped: an image that cannot be decoded, or
whose shorter side is below `min(min_side, resolution)` (a 1x1 image blown up to a training square
would teach nothing), is replaced by the next good one in the list. Each replacement travels with
its batch, so the iterator's `stats` count them exactly with threads and worker processes alike (the
names of the DiT loader's, svg_jax/data/pipeline.py: `bad_records`, `bad_record_reports`; they are
part of the state); each bad image is logged once per process, not every epoch.
`max_bad_in_a_row` bad ones in a row are a `BadImagesInARow` (an InputError: a wrong folder or a
broken mount rather than a few bad files). A held-out image that cannot be used is a
`BadHeldOutImage` at start-up: replacing it would change the evaluation set.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
from typing import Sequence

import grain
import numpy as np

from svg_jax.data import jsonl as jsonl_lib
from svg_jax.data import grain_reading
from svg_jax.data.global_position import agreed_position, process_of
from svg_jax.data.images import BadImageError, open_rgb
from svg_jax.input_errors import InputError, MissingInput

log = logging.getLogger(__name__)

CROPS = ("random", "center")
# precompute.min_side's default (svg_jax/config.py): the DiT's data refuses the same images.
DEFAULT_MIN_SIDE = 64
# /2: {"format", "signature", "grain", "stats"}; /1 was Grain's {"next_index": k} alone.
STATE_FORMAT = "svg_jax.data.image_pipeline/2"
# How a signature field is named to the user (the config fields that set it).
_SIGNATURE_NAMES = {
    "image_list_sha256": "the image list (data.jsonl's paths, in order)",
    "num_images": "the number of images (data.jsonl)",
    "global_batch_size": "train.global_batch_size",
    "seed": "data.shuffle_seed",
    "num_workers": "data.num_workers",
}
_NAMED_IN_ERRORS = 3  # bad images named in one error line; the rest are counted


class BadImagesInARow(InputError):
  """`max_bad_in_a_row` consecutive images of the list cannot be used (or none of them can)."""


class BadHeldOutImage(InputError):
  """A held-out image that cannot be used: refused at start-up, never replaced."""


class LoaderStateMismatch(InputError):
  """A saved loader state whose position means other images (another list, batch, seed)."""


@dataclasses.dataclass(frozen=True)
class ImagePipelineConfig:
  per_process_batch_size: int
  resolution: int
  seed: int = 0
  num_threads: int = 2
  prefetch_buffer_size: int = 2
  crop: str = "random"
  max_bad_in_a_row: int = 64  # consecutive unreadable images tolerated before giving up
  min_side: int = DEFAULT_MIN_SIDE  # shorter side below min(min_side, resolution): a bad image
  num_workers: int = 0  # Grain worker processes (0: decode in this process's threads)
  max_reports: int = 100  # distinct bad images kept in the state (the count is exact)

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
    if self.min_side < 1:
      problems.append(f"min_side {self.min_side} < 1")
    if self.num_workers < 0:
      problems.append(f"num_workers {self.num_workers} < 0")
    if problems:
      raise ValueError("; ".join(problems))


def effective_min_side(min_side: int, resolution: int) -> int:
  """The shorter side an image needs: `min_side`, but never more than the training square (an
  image as large as the square it is cut to is never refused)."""
  return max(1, min(int(min_side), int(resolution)))


def _list_entries(jsonl: str) -> list[str]:
  """The `path` values of a jsonl as written; InputError at the first bad line."""
  if os.path.isdir(jsonl):
    raise InputError(f"image list {jsonl} is a folder, not a jsonl file of {{\"path\": ...}} "
                     "lines")
  if not os.path.isfile(jsonl):
    raise MissingInput(f"image list {jsonl} does not exist")
  out = []
  for line in jsonl_lib.lines(jsonl):
    if line.problem:
      raise InputError(f"{jsonl}:{line.number} is {line.problem}")
    if "path" not in line.item:
      raise InputError(f"{jsonl}:{line.number} has no \"path\"")
    path = line.item["path"]
    if not isinstance(path, str) or not path:
      raise InputError(f"{jsonl}:{line.number} has a \"path\" that is not a non-empty string: "
                       f"{path!r}")
    out.append(path)
  if not out:
    raise InputError(f"{jsonl} lists no images")
  return out


def _resolve(jsonl: str, entries: Sequence[str]) -> list[str]:
  base = os.path.dirname(os.path.abspath(jsonl))
  return [os.path.join(base, e) for e in entries]


def read_image_list(jsonl: str | os.PathLike) -> list[str]:
  """The image paths of a jsonl (absolute; relative ones resolved against the jsonl's folder)."""
  jsonl = os.fspath(jsonl)
  return _resolve(jsonl, _list_entries(jsonl))


def image_list_fingerprint(entries: Sequence[str]) -> str:
  """sha256 of the list's paths as written, in order. Not of the resolved paths: the same list
  read from another mount point (a moved dataset, another host) holds the same images."""
  h = hashlib.sha256()
  for e in entries:
    h.update(e.encode("utf-8", "surrogateescape") + b"\n")
  return h.hexdigest()


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


def load_square(path: str, resolution: int, rng: np.random.Generator | None = None,
                min_side: int = 1) -> np.ndarray:
  """One image -> uint8 [resolution, resolution, 3]: the shorter side to `resolution`, then a
  random square (from `rng`) or the centred one. BadImageError when it cannot be decoded or its
  shorter side is below `min_side`."""
  image, _ = open_rgb(path, min_size=min_side)
  resized = shorter_side_to(np.asarray(image, np.uint8).reshape(image.height, image.width, 3),
                            resolution)
  top, left = crop_offsets(resized.shape[0], resized.shape[1], resolution, rng)
  return resized[top:top + resolution, left:left + resolution]


def _reason(error: Exception) -> str:
  """Why an image is bad, on one line and without its path (the caller names it)."""
  text = error.reason if isinstance(error, BadImageError) else (
      f"{type(error).__name__}: {getattr(error, 'strerror', None) or error}")
  return " ".join(str(text).split())


def _named(bad: Sequence[tuple[str, str]], total: int) -> str:
  """`path (reason); ...` of the first few bad images, and how many more."""
  out = "; ".join(f"{p} ({r})" for p, r in bad[:_NAMED_IN_ERRORS])
  return out + (f"; and {total - _NAMED_IN_ERRORS} more" if total > _NAMED_IN_ERRORS else "")


class _Loader:
  """(stream position, index) -> {"image": cropped image, "_bad": [(path, reason), ...]}: a bad
  image is replaced by the next good one and travels with the example, so the consumer counts it
  (also from Grain worker processes). Picklable."""

  def __init__(self, paths: Sequence[str], config: ImagePipelineConfig, source: str = ""):
    self.paths, self.resolution, self.crop = list(paths), config.resolution, config.crop
    self.seed, self.max_bad = int(config.seed), config.max_bad_in_a_row
    self.min_side = effective_min_side(config.min_side, config.resolution)
    self.source = source or "the image list"

  def __call__(self, position_and_index: tuple[int, int]) -> dict:
    position, index = position_and_index
    n = len(self.paths)
    # A replacement image is cropped with the offsets the bad one would have had.
    rng = np.random.default_rng([self.seed, int(position)]) if self.crop == "random" else None
    bad = []
    tries = min(self.max_bad, n)
    for j in range(tries):
      path = self.paths[(int(index) + j) % n]
      try:
        return {"image": load_square(path, self.resolution, rng, self.min_side), "_bad": bad}
      except (BadImageError, OSError) as e:
        bad.append((path, _reason(e)))
    if tries == n:
      raise BadImagesInARow(f"none of the {n} images of {self.source} can be used: "
                            f"{_named(bad, tries)}")
    raise BadImagesInARow(
        f"{tries} images in a row of {self.source} cannot be used (data.max_bad_in_a_row = "
        f"{self.max_bad}; a wrong folder or a broken mount?), from image {int(index) + 1} of "
        f"{n}: {_named(bad, tries)}")


def _with_position(position: int, index: int) -> tuple[int, int]:
  return position, index


def _collate(items: Sequence[dict]) -> dict:
  return {"image": np.stack([e["image"] for e in items]),
          "_bad": [b for e in items for b in e["_bad"]]}


def _empty_stats() -> dict:
  return {"batches": 0, "examples": 0, "bad_records": 0, "bad_record_reports": []}


class ImageIterator:
  """The Grain iterator of one process, resumable from the states of any process count; counts
  the bad images replaced in the batches it returned (`stats`, part of the state)."""

  def __init__(self, grain_iterator, signature: dict | None = None, max_reports: int = 100):
    self._it = grain_iterator
    self.signature = dict(signature or {})
    self._max_reports = max_reports
    self._stats = _empty_stats()
    self._logged: set[str] = set()  # bad images logged by this process: once each, not per epoch

  def __iter__(self):
    return self

  @property
  def stats(self) -> dict:
    return copy.deepcopy(self._stats)

  def __next__(self) -> dict:
    batch = next(self._it)
    bad = batch.pop("_bad")
    s = self._stats
    s["batches"] += 1
    s["examples"] += len(batch["image"])
    for path, reason in bad:
      s["bad_records"] += 1
      if path in self._logged:
        continue
      self._logged.add(path)
      report = f"{path}: {reason}"
      if len(s["bad_record_reports"]) < self._max_reports and report not in s[
          "bad_record_reports"]:
        s["bad_record_reports"].append(report)
      log.error("bad image %s (%s): replaced by the next image of the list (counted in "
                "bad_records; logged once)", path, reason)
    return batch

  def get_state(self) -> dict:
    return {"format": STATE_FORMAT, "signature": self.signature, "grain": self._it.get_state(),
            "stats": self.stats}

  def set_state(self, state: dict) -> None:
    self._restore([state], 0)

  def set_state_of_processes(self, states: Sequence[dict], process_index: int) -> None:
    """Resumes from the states P processes saved: every one holds the same global position; the
    counters are per process, so process 0 takes their sums and the others start at zero."""
    self._restore(states, process_index)

  def _restore(self, states: Sequence[dict], process_index: int) -> None:
    if not states:
      raise ValueError("no saved image-loader state")
    if all(isinstance(s, dict) and "format" not in s and "next_index" in s for s in states):
      position = agreed_position(states, "image-loader")
      log.warning("the image-loader state %s predates the check of what its position means: "
                  "resuming there without checking that the image list, train.global_batch_size "
                  "and data.shuffle_seed are the ones it was saved with; its bad-image counts "
                  "start at zero", json.dumps(position))
      self._it.set_state(position)
      self._stats = _empty_stats()
      return
    for s in states:
      _check_state(s, self.signature)
    position = agreed_position([s["grain"] for s in states], "image-loader")
    stats = _empty_stats()
    if process_index == 0:
      for s in states:
        for key in ("examples", "bad_records"):
          stats[key] += int(s["stats"][key])
        stats["bad_record_reports"] = (stats["bad_record_reports"]
                                       + list(s["stats"]["bad_record_reports"]))
      stats["bad_record_reports"] = stats["bad_record_reports"][:self._max_reports]
    stats["batches"] = int(states[0]["stats"]["batches"])  # global batches: not summed
    self._it.set_state(position)
    self._stats = stats

  def start_prefetch(self) -> None:
    getattr(self._it, "start_prefetch", lambda: None)()

  def close(self) -> None:
    getattr(self._it, "close", lambda: None)()


def _check_state(state, signature: dict) -> None:
  if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
    raise LoaderStateMismatch(
        f"not an image-loader state of format {STATE_FORMAT!r} (got "
        f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
  theirs, ours = state.get("signature") or {}, signature
  diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
  if diff:
    raise LoaderStateMismatch(
        "the saved image-loader position would mean other images in this run; differing: "
        + ", ".join(f"{_SIGNATURE_NAMES.get(k, k)} (saved {theirs.get(k)!r}, now "
                    f"{ours.get(k)!r})" for k in diff))


def make_image_pipeline(jsonl: str | os.PathLike, config: ImagePipelineConfig, *,
                        process_index: int | None = None, process_count: int | None = None
                        ) -> ImageIterator:
  """The training iterator (see the module docstring)."""
  config.validate()
  process_index, process_count = process_of(process_index, process_count)
  jsonl = os.fspath(jsonl)
  entries = _list_entries(jsonl)
  paths = _resolve(jsonl, entries)
  ds = (grain.MapDataset.range(len(paths))
        .shuffle(seed=int(config.seed))
        .repeat()
        .map_with_index(_with_position)  # before the slice: the position in the global stream
        [process_index::process_count]
        .map(_Loader(paths, config, source=jsonl))
        .batch(config.per_process_batch_size, drop_remainder=True, batch_fn=_collate))
  it_ds = grain_reading.read(ds, num_threads=config.num_threads,
                             prefetch_buffer_size=config.prefetch_buffer_size,
                             num_workers=config.num_workers)
  signature = {"image_list_sha256": image_list_fingerprint(entries), "num_images": len(entries),
               "global_batch_size": config.per_process_batch_size * process_count,
               "seed": int(config.seed), "num_workers": int(config.num_workers)}
  return ImageIterator(iter(it_ds), signature, config.max_reports)


def load_eval_images(jsonl: str | os.PathLike, resolution: int, count: int,
                     min_side: int = DEFAULT_MIN_SIDE) -> np.ndarray:
  """The first `count` images of a jsonl (in file order), centre squares: uint8 [count, R, R, 3].
  BadHeldOutImage naming every one of them that cannot be used (the same rules as training's,
  `min_side` included): the evaluation set is fixed, so none is skipped or replaced."""
  paths = read_image_list(jsonl)
  if count > len(paths):
    raise InputError(f"{jsonl} lists {len(paths)} images, fewer than the {count} asked for")
  limit = effective_min_side(min_side, resolution)
  images, bad = [], []
  for p in paths[:count]:
    try:
      images.append(load_square(p, resolution, None, limit))
    except (BadImageError, OSError) as e:
      bad.append((p, _reason(e)))
  if bad:
    raise BadHeldOutImage(
        f"{len(bad)} of the first {count} held-out images of {os.fspath(jsonl)} cannot be used "
        f"(data.heldout_jsonl; held-out images are never replaced, that would change the "
        f"evaluation set: fix or remove them): {_named(bad, len(bad))}")
  return np.stack(images)
