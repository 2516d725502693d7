"""Input sources of the precompute job: what the items are and how one is loaded.

Inputs (`list_inputs`), each item with a source key that names it in every report:
  jsonl   the official training list: one JSON object a line, `{"path", "prompt"}` or
          `{"image_path", "super_high_quality_caption"}` (relative paths are resolved against the
          jsonl's folder; blank lines are skipped); the key is the path as written, a bad line's
          key is `<file>:<line number>`.
  folder  image files (by extension, `IMAGE_EXTENSIONS`) with a same-name `.txt` caption next to
          each; the key is the file name relative to the folder. A caption without a supported
          image beside it is a bad input: the file of another type it captions (`photo.heic`:
          unsupported image type), or the caption itself when it captions no file. Other files
          (`notes.md`) are not inputs. Links to folders are followed, each folder read once.
  tfds    a prepared TFDS dataset (ArrayRecord file format) read through `tfds.data_source`, which
          needs tensorflow-datasets but not TensorFlow; the key is `<name>/<split>[<index>]`.

`load_item`: caption check, image decode (`images.open_rgb`: RGBA / LA / P / CMYK / gray / 16-bit
inputs are CONVERTED to RGB and counted per conversion kind, not dropped), official bucket + center
crop at `resolution`. A bad input raises `BadInput` with the reason the job reports.

Keys and captions that UTF-8 cannot hold (a file name of other bytes, a lone surrogate escape in
a jsonl) are bad inputs: records and reports store UTF-8. A source that does not exist, is of
another kind than `input_format` says, or holds no usable input raises an `InputError`: one line,
before any model is loaded.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import os
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from svg_jax import text as text_lib
from svg_jax.data import buckets as buckets_lib
from svg_jax.data import images as images_lib
from svg_jax.data import jsonl as jsonl_lib
from svg_jax.input_errors import InputError, MissingInput

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
INPUT_FORMATS = ("jsonl", "folder", "tfds")


@dataclasses.dataclass(frozen=True)
class Item:
  """One input. `image` is a path, encoded bytes or a decoded array; `error` marks an input that
  is bad before anything is read (a bad jsonl line, a missing caption file)."""
  key: str
  image: Any = None
  caption: Any = None
  system_prompt: str = text_lib.BASE_SYSTEM_PROMPT
  error: str | None = None


class Inputs:
  """An ordered, indexable list of inputs and a fingerprint of it (for the resume plan)."""

  def __init__(self, get: Callable[[int], Item], length: int, fingerprint: str):
    self._get, self._len, self.fingerprint = get, length, fingerprint

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> Item:
    return self._get(index)

  @classmethod
  def from_items(cls, items: Sequence[Item]) -> "Inputs":
    """The fingerprint covers each item's key, caption and system prompt: a rerun over edited
    captions is another dataset, refused by the resume plan instead of mixed into it."""
    items = list(items)
    h = hashlib.sha256()
    for it in items:
      for part in (it.key, it.caption, it.system_prompt, it.error):
        h.update(repr(part).encode("utf-8", "backslashreplace") + b"\0")
    return cls(items.__getitem__, len(items), "items-sha256:" + h.hexdigest())


def _not_utf8(text: str) -> bool:
  """A str that UTF-8 cannot hold: a file name of other bytes (os.fsdecode's surrogates) or a
  lone surrogate from a JSON escape; the records and reports could not store it."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return True
  return False


def _printable(text: str) -> str:
  """`text` with what UTF-8 cannot hold written as escapes (a key for the reports)."""
  return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _caption_and_prompt(obj: dict, system_prompt: str) -> tuple[Any, str]:
  caption, prompt = text_lib.training_caption(obj)
  if system_prompt != "auto":
    prompt = text_lib.SYSTEM_PROMPTS[system_prompt]
  return caption, prompt


def read_jsonl(path: str, system_prompt: str = "auto") -> list[Item]:
  """Items of an official training jsonl (see the module docstring)."""
  if os.path.isdir(path):
    raise InputError(f"input {path} is a folder, not a jsonl file; for a folder of images with "
                     ".txt captions give --input_format folder")
  if not os.path.isfile(path):
    raise MissingInput(f"input jsonl {path} does not exist")
  root = os.path.dirname(os.path.abspath(path))
  name = os.path.basename(path)
  items = []
  for line in jsonl_lib.lines(path):
    where = f"{name}:{line.number}"
    if line.problem:
      items.append(Item(where, error=f"bad jsonl line: {line.problem}"))
      continue
    obj = line.item
    rel = obj.get("path", obj.get("image_path"))
    if not isinstance(rel, str) or not rel:
      items.append(Item(where, error="bad jsonl line: no 'path' / 'image_path' string (keys "
                        f"{sorted(obj)})"))
      continue
    if _not_utf8(rel):
      items.append(Item(_printable(rel), error=f"bad jsonl line {where}: the path is not valid "
                        "UTF-8 text (a lone surrogate escape)"))
      continue
    try:
      caption, prompt = _caption_and_prompt(obj, system_prompt)
    except ValueError as e:
      items.append(Item(rel, error=f"bad jsonl line {where}: {e}"))
      continue
    items.append(Item(rel, os.path.join(root, rel), caption, prompt))
  _log_repeated_keys(items, name)
  return items


def _log_repeated_keys(items: Sequence[Item], source: str) -> None:
  """Says when paths repeat: each copy becomes a record (a list may oversample on purpose), and
  a bad input's report names the path, which then stands for several lines."""
  counts = collections.Counter(it.key for it in items if it.error is None)
  repeated = {k: n for k, n in counts.items() if n > 1}
  if repeated:
    first = next(iter(repeated))
    logging.warning("%s: %d paths appear more than once (%d extra lines; first: %s, %d times); "
                    "each line becomes a record", source, len(repeated),
                    sum(repeated.values()) - len(repeated), first, repeated[first])


def read_folder(folder: str, system_prompt: str = "auto") -> list[Item]:
  """Image files of a folder (sorted, recursive) with same-name `.txt` captions, and the captions
  without a supported image as bad inputs (see the module docstring)."""
  if os.path.isfile(folder):
    raise InputError(f"input folder {folder} is a file; for a jsonl file give --input_format jsonl")
  if not os.path.isdir(folder):
    raise MissingInput(f"input folder {folder} does not exist")
  prompt = text_lib.SYSTEM_PROMPTS["base" if system_prompt == "auto" else system_prompt]
  items = []
  top = os.path.realpath(folder)
  seen_folders = {top}
  # Links to folders are followed (os.walk's default skips them, and their images with them),
  # and each folder is read once: a link into the input folder (a loop, or a second name of a
  # folder read under its own) or a second link to a folder read already is a bad input.
  for root, dirs, files in os.walk(folder, followlinks=True):
    for d in sorted(dirs):
      path = os.path.join(root, d)
      real = os.path.realpath(path)
      inside = real == top or real.startswith(top + os.sep)
      if real in seen_folders or (inside and os.path.islink(path)):
        dirs.remove(d)
        items.append(Item(_printable(os.path.relpath(path, folder)), error=(
            f"a second way to the folder {real} (a link): its files are read once, by their "
            "own names")))
      else:
        seen_folders.add(real)
    dirs.sort()
    by_stem: dict[str, list[str]] = {}
    for fname in files:
      by_stem.setdefault(os.path.splitext(fname)[0], []).append(fname)
    for fname in sorted(files):
      path = os.path.join(root, fname)
      key = os.path.relpath(path, folder)
      if not fname.lower().endswith(IMAGE_EXTENSIONS):
        error = _unusable_file_error(fname, by_stem[os.path.splitext(fname)[0]])
        if error is not None:
          items.append(Item(_printable(key), error=error))
        continue
      if _not_utf8(key):
        items.append(Item(_printable(key), error="the file name is not valid UTF-8 (rename it)"))
        continue
      txt = os.path.splitext(path)[0] + ".txt"
      if not os.path.isfile(txt):
        items.append(Item(key, error=f"missing caption file {os.path.relpath(txt, folder)}"))
        continue
      try:
        with open(txt, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is no caption text
          caption = f.read().strip()
      except (OSError, UnicodeDecodeError) as e:
        items.append(Item(key, error=f"unreadable caption file ({e})"))
        continue
      items.append(Item(key, path, caption, prompt))
  items.sort(key=lambda it: it.key)
  return items


def _unusable_file_error(fname: str, same_stem: list[str]) -> str | None:
  """Why `fname`, not a supported image, is a bad input of its folder, where the files of its
  stem are `same_stem`; None when it is no input at all."""
  stem, ext = os.path.splitext(fname)
  if any(n.lower().endswith(IMAGE_EXTENSIONS) for n in same_stem):
    return None  # the caption of a supported image, or a file beside one
  if ext == ".txt":
    if len(same_stem) > 1:
      return None  # the caption of a file of another type, which is the bad input
    return f"caption file without an image (no {stem} with one of {', '.join(IMAGE_EXTENSIONS)})"
  if stem + ".txt" in same_stem:
    return (f"unsupported image type {ext or '(no extension)'} (supported: "
            f"{', '.join(IMAGE_EXTENSIONS)})")
  return None


def _check_usable(items: Sequence[Item], source: str, expected: str) -> None:
  """An InputError when no item of `source` can give a record."""
  if not items:
    raise InputError(f"no inputs found in {source}; expected {expected}")
  bad = [it for it in items if it.error is not None]
  if len(bad) == len(items):
    raise InputError(f"no usable inputs in {source}: all {len(bad)} are bad (first: {bad[0].key}: "
                     f"{bad[0].error}); expected {expected}")


def read_tfds(name: str, split: str, data_dir: str = "", image_key: str = "image",
              caption_key: str = "caption", system_prompt: str = "auto") -> Inputs:
  """A prepared TFDS dataset through `tfds.data_source` (random access, no TensorFlow)."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise InputError("--input_format tfds needs tensorflow-datasets (`pip install "
                     "tensorflow-datasets`; TensorFlow itself is not needed)") from e
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir or None)
  except Exception as e:  # noqa: BLE001  (tfds raises its own types: not found, unknown split...)
    first = " ".join(str(e).split())[:300]
    raise InputError(f"tfds dataset {name!r} split {split!r} (data dir "
                     f"{data_dir or 'the default'}) cannot be opened: {type(e).__name__}: "
                     f"{first}") from None
  prompt = text_lib.SYSTEM_PROMPTS["base" if system_prompt == "auto" else system_prompt]
  _check_tfds_features(source, name, image_key, caption_key)

  def get(i: int) -> Item:
    key = f"{name}/{split}[{i}]"
    try:
      ex = source[i]
    except Exception as e:  # a record that cannot be read or decoded is one bad input
      return Item(key, error=f"unreadable tfds example ({type(e).__name__}: {e})")
    missing = [k for k in (image_key, caption_key) if _tfds_feature(ex, k) is None]
    if missing:
      return Item(key, error=f"tfds example has no {missing} (features {_feature_names(ex)})")
    caption = _tfds_caption(_tfds_feature(ex, caption_key))
    if isinstance(caption, bytes):
      try:
        caption = caption.decode("utf-8")
      except UnicodeDecodeError:
        return Item(key, error="caption is not UTF-8 text")
    return Item(key, _tfds_feature(ex, image_key), caption, prompt)

  return Inputs(get, len(source), _tfds_fingerprint(source, name, split))


_TFDS_SAMPLED = 16  # examples read for the fingerprint: a few decodes at start-up


def _tfds_fingerprint(source: Any, name: str, split: str) -> str:
  """The dataset's identity for the resume plan without reading it all: name, split, length,
  the version and each split's bytes and shard lengths as its preparation recorded them (in its
  dataset_info, so the same files anywhere give the same fingerprint), and the contents of
  `_TFDS_SAMPLED` examples spread over it (all of a smaller one). A dataset prepared again with
  other content is another dataset, refused instead of mixed into the records made from the
  first; an edit that keeps every size and misses the sampled examples is not seen."""
  n = len(source)
  h = hashlib.sha256()

  def add(*parts: Any) -> None:
    for part in parts:
      h.update(repr(part).encode("utf-8", "backslashreplace") + b"\0")

  info = getattr(source, "dataset_info", None)
  add(getattr(info, "full_name", name), split, n)
  splits = getattr(info, "splits", None) or {}
  for key in sorted(splits.keys()):
    add(key, int(splits[key].num_bytes), list(splits[key].shard_lengths))
  spread = (range(n) if n <= _TFDS_SAMPLED else
            sorted({k * (n - 1) // (_TFDS_SAMPLED - 1) for k in range(_TFDS_SAMPLED)}))
  for i in spread:
    try:
      _add_contents(h, source[i])
    except Exception as e:  # noqa: BLE001  (a record that cannot be read: stable, and reported)
      add("unreadable", i, type(e).__name__)
  return f"tfds:{name}/{split}:{n}:sha256:{h.hexdigest()}"


def _add_contents(h: Any, value: Any) -> None:
  """Feeds an example's features (nested dicts, lists, arrays, bytes, text) to hash `h`."""
  if isinstance(value, dict):
    for key in sorted(value):
      h.update(repr(key).encode() + b"\0")
      _add_contents(h, value[key])
  elif isinstance(value, (list, tuple)):
    h.update(f"[{len(value)}".encode())
    for item in value:
      _add_contents(h, item)
  else:
    array = np.asarray(value)
    if array.dtype == object:  # texts as bytes
      h.update(repr(array.tolist()).encode("utf-8", "backslashreplace"))
    else:
      h.update(f"{array.dtype}{array.shape}".encode() + array.tobytes())


def _tfds_feature(ex: Any, key: str) -> Any:
  """The feature `key` of an example, None when absent; "a/b" is feature b inside the nested
  feature a (TFDS's own notation: COCO's captions are `captions/text`)."""
  value = ex
  for part in key.split("/"):
    if not isinstance(value, dict) or part not in value:
      return None
    value = value[part]
  return value


def _feature_names(ex: dict, prefix: str = "") -> list[str]:
  """Every feature of an example, nested ones as "a/b"."""
  names = []
  for k, v in ex.items():
    names += _feature_names(v, f"{prefix}{k}/") if isinstance(v, dict) else [f"{prefix}{k}"]
  return sorted(names)


def _tfds_caption(value: Any) -> Any:
  """A caption feature: text, or a sequence of texts (several captions per image, as COCO's),
  of which the first is the image's caption, as training takes one per image."""
  if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1):
    return value[0] if len(value) else ""
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return value.item()
  return value


def _check_tfds_features(source: Any, name: str, image_key: str, caption_key: str) -> None:
  """InputError when the first example lacks the image or caption feature, or its caption is
  no text: a wrong key would otherwise make every example a bad input, found only after all
  were read."""
  if not len(source):
    return
  try:
    first = source[0]
  except Exception:  # noqa: BLE001  (an unreadable example is reported as a bad input later)
    return
  missing = [k for k in (image_key, caption_key) if _tfds_feature(first, k) is None]
  if missing:
    raise InputError(f"tfds dataset {name!r} has no feature {' or '.join(map(repr, missing))} "
                     f"(its features: {_feature_names(first)}); set precompute.tfds_image_key / "
                     "tfds_caption_key (a nested feature as 'a/b')")
  caption = _tfds_caption(_tfds_feature(first, caption_key))
  if not isinstance(caption, (str, bytes)):
    raise InputError(f"tfds dataset {name!r}: feature {caption_key!r} is no text (its first "
                     f"example's is {type(caption).__name__} {np.shape(caption)}); set "
                     "precompute.tfds_caption_key to the caption's feature")


def list_inputs(source: str, input_format: str, cfg: ml_collections.ConfigDict) -> Inputs:
  """The ordered inputs of `source` in `input_format` (jsonl | folder | tfds)."""
  if input_format == "jsonl":
    items = read_jsonl(source, cfg.system_prompt)
    _check_usable(items, source, "one JSON object a line with `path` and `prompt` (or "
                  "`image_path` and `super_high_quality_caption`)")
    return Inputs.from_items(items)
  if input_format == "folder":
    items = read_folder(source, cfg.system_prompt)
    _check_usable(items, source, f"image files ({', '.join(IMAGE_EXTENSIONS)}), each with a "
                  "same-name .txt caption")
    return Inputs.from_items(items)
  if input_format == "tfds":
    inputs = read_tfds(source, cfg.tfds_split, cfg.tfds_data_dir, cfg.tfds_image_key,
                       cfg.tfds_caption_key, cfg.system_prompt)
    if not len(inputs):
      raise InputError(f"no usable inputs in {source}: its split {cfg.tfds_split!r} is empty")
    return inputs
  raise ValueError(f"input format {input_format!r} is not one of {INPUT_FORMATS}")


# ----------------------------------------------------------------------------------------------
# Per-item loading (threads)


class BadInput(Exception):
  """An input that gives no record; `reason` says why."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def _array_image(arr: Any) -> Any:
  """A decoded tfds image array -> what `images.open_rgb` takes (RGB stays an array)."""
  arr = np.asarray(arr)
  if arr.ndim == 3 and arr.shape[-1] == 3 and arr.dtype == np.uint8:
    return arr
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  try:  # other layouts go through PNG so open_rgb applies its documented mode conversions
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
  except (TypeError, ValueError, OSError) as e:
    raise BadInput(f"unsupported image array {arr.dtype} {arr.shape} ({e})") from None
  return buf.getvalue()


def check_caption(caption: Any) -> str:
  if not isinstance(caption, str):
    raise BadInput(f"caption is not a string ({type(caption).__name__}: {caption!r:.60})")
  if not caption.strip():
    raise BadInput("empty caption")
  if _not_utf8(caption):
    raise BadInput("caption is not valid UTF-8 text (a lone surrogate escape)")
  return caption


@dataclasses.dataclass
class Loaded:
  item: Item
  crop: np.ndarray  # uint8 [h, w, 3]
  bucket: tuple[int, int]  # latent units (rows, cols)
  orig_size: tuple[int, int]  # (w, h) pixels
  conversion: str
  exif_orientation: int = 1  # not applied (images_lib.ImageInfo)


def load_item(item: Item, cfg: ml_collections.ConfigDict, patch_size: int) -> Loaded:
  """Caption check, decode, mode conversion, bucket + crop; raises BadInput."""
  if item.error is not None:
    raise BadInput(item.error)
  check_caption(item.caption)
  src = item.image
  if isinstance(src, np.ndarray):
    src = _array_image(src)
  try:
    if isinstance(src, np.ndarray):
      h, w = src.shape[:2]
      if min(h, w) < cfg.min_side:
        raise images_lib.BadImageError(f"too small: {w}x{h}, shorter side < {cfg.min_side}")
      rgb, conversion, orientation = Image.fromarray(src), "none", 1
    else:
      rgb, info = images_lib.open_rgb(src, min_size=cfg.min_side)
      w, h, conversion = info.width, info.height, info.conversion
      orientation = info.exif_orientation
  except images_lib.BadImageError as e:
    raise BadInput(e.reason) from None
  bucket_list = buckets_lib.buckets_for_resolution(cfg.resolution, patch_size, cfg.max_ratio)
  crop, (bw, bh) = buckets_lib.bucket_crop(rgb, bucket_list)
  crop = np.asarray(crop, np.uint8).reshape(bh, bw, 3)
  return Loaded(item, crop, buckets_lib.latent_hw((bw, bh), patch_size), (w, h), conversion,
                orientation)
