"""Feature precomputation: images + captions -> normalized DINOv3 latents + Gemma-2 features, as
ArrayRecord shards and a manifest the training pipeline reads (`launch/precompute.py` is the CLI).

Inputs (`list_inputs`), each item with a source key that names it in every report:
  jsonl   the official training list: one JSON object a line, `{"path", "prompt"}` or
          `{"image_path", "super_high_quality_caption"}` (relative paths are resolved against the
          jsonl's folder; blank lines are skipped); the key is the path as written, a bad line's
          key is `<file>:<line number>`.
  folder  image files (by extension) with a same-name `.txt` caption next to each; the key is the
          file name relative to the folder.
  tfds    a prepared TFDS dataset (ArrayRecord file format) read through `tfds.data_source`, which
          needs tensorflow-datasets but not TensorFlow; the key is `<name>/<split>[<index>]`.

Work per item: caption check, image decode (`images.open_rgb`: RGBA / LA / P / CMYK / gray /
16-bit inputs are CONVERTED to RGB and counted per conversion kind, not dropped), official bucket +
center crop at `resolution`; items are grouped by bucket and encoded `batch_size` at a time by the
jitted SVGAutoencoder (batch sharded over this process's devices) and the jitted Gemma-2
(`text.TextEncoder`). The caption gets its system prompt by the official training rule
(`text.training_caption`) unless `system_prompt` names one. Records hold bf16 latents and either
bf16 text features cut to their valid length or the token ids.

Bad inputs (missing / zero-byte / corrupt / truncated image, image smaller than `min_side`, image
mode that cannot be converted, empty or non-string caption, missing `.txt`, bad jsonl line) are
reported as {"key", "reason"} in the manifest's `bad_inputs` and on the console; the job goes on.

Resumability and processes. The ordered input list is cut into chunks of `records_per_shard`
consecutive inputs; chunk c belongs to process c % process_count. A chunk is written through a
`records.DatasetWriter` into a scratch folder (at most one shard per bucket, since a chunk holds at
most records_per_shard inputs), its shards are renamed into the output as
`c<chunk>-p<process>-<bucket>-<n>.array_record`, and then `progress/chunk-<c>.json` (its shards,
bad inputs, conversions, text lengths) is written atomically: that file is what marks a chunk done.
A rerun skips done chunks and redoes any other one from scratch (its stale shards removed);
`progress/plan.json` pins the input list, chunking and models, so a rerun with anything else
changed is refused instead of mixing two datasets. The process that finds every chunk done writes
`empty_text.npy` and `manifest.json` (schema of records.py, plus `text_len_histogram`,
`conversions`, `empty_text`, `precompute`); all of them produce the same bytes.

`empty_text.npy` holds the features of the unconditional caption "" (<bos> alone, 1 token),
[1, D] float32 of bf16-rounded values like the records: what `train.loop.load_empty_text` reads
for caption dropout (`data.empty_text = "auto"`). In token-id mode it holds the ids [1] int32.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Callable, Sequence

import ml_dtypes
import ml_collections
import numpy as np
from PIL import Image

from svg_jax import latent_stats as ls_lib
from svg_jax import text as text_lib
from svg_jax.data import buckets as buckets_lib
from svg_jax.data import images as images_lib
from svg_jax.data import jsonl as jsonl_lib
from svg_jax.data import records

PROGRESS_DIR = "progress"
PLAN_FILE = "plan.json"
EMPTY_TEXT_FILE = "empty_text.npy"  # the name train.loop.load_empty_text looks for
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
INPUT_FORMATS = ("jsonl", "folder", "tfds")
TEXT_MODES = ("features", "token_ids")
MAX_CONVERSION_EXAMPLES = 20  # keys listed per conversion kind in the manifest


def precompute_defaults() -> ml_collections.ConfigDict:
  """The `config.precompute` section (the encoder comes from `config.autoencoder`)."""
  c = ml_collections.ConfigDict()
  # Local HF-format Gemma-2 folder (config.json + safetensors) and its tokenizer folder
  # ("" = the same folder). In token_ids mode only the tokenizer is read.
  c.text_encoder_dir = ""
  c.tokenizer_dir = ""
  c.hidden_layer = -2  # official: hidden_states[-2]
  # Token budget including <bos> and the system prompt: official training truncates at 256.
  c.max_length = text_lib.TRAIN_MAX_LENGTH
  # "auto" = the official training rule (`super_high_quality_caption` items get the `align`
  # prompt, all others `base`), or a name of text.SYSTEM_PROMPTS forced on every caption.
  c.system_prompt = "auto"
  c.text_mode = "features"  # features (bf16 hidden states) | token_ids (text encoder run online)
  c.resolution = 256  # bucket set of this training resolution (15 buckets at 256, 27 at 512)
  c.max_ratio = 4.0  # largest aspect ratio of the buckets (official 4)
  c.min_side = 64  # images whose shorter side is below this many pixels are reported as tiny
  c.batch_size = 16  # images (and captions) per jitted encoder call, per bucket
  c.records_per_shard = 1024  # inputs per chunk = most records in one shard; also the resume unit
  # "uncompressed" (the loader reads ~2x faster, bench/loader.py) or "zstd" (~22% smaller shards,
  # for hosts with loader cores to spare).
  c.shard_compression = records.DEFAULT_COMPRESSION
  # Storage dtype of latents and text features. Schema v1 stores floats as bfloat16 only.
  c.output_dtype = "bfloat16"
  c.num_threads = 4  # image decode / crop threads
  # -1 = jax.process_index() / jax.process_count(); set both to split a job by hand.
  c.process_index = -1
  c.process_count = -1
  # tfds input: split, data_dir ("" = TFDS's default) and the feature names.
  c.tfds_split = "train"
  c.tfds_data_dir = ""
  c.tfds_image_key = "image"
  c.tfds_caption_key = "caption"
  return c


def default_config() -> ml_collections.ConfigDict:
  """`autoencoder` + `precompute` sections: what `launch/precompute.py` reads."""
  from svg_jax import autoencoder  # jax-heavy; only when a full config is wanted

  c = ml_collections.ConfigDict()
  c.autoencoder = autoencoder.autoencoder_defaults()
  c.precompute = precompute_defaults()
  return c


def get_config() -> ml_collections.ConfigDict:
  """So that this file can be given as an ml_collections config file (the CLI's default)."""
  return default_config()


def validate_config(c: ml_collections.ConfigDict) -> None:
  problems = []
  if c.text_mode not in TEXT_MODES:
    problems.append(f"text_mode {c.text_mode!r} is not one of {TEXT_MODES}")
  elif c.text_mode == "features" and not c.text_encoder_dir:
    problems.append("text_encoder_dir is empty (a local Gemma-2 folder) but text_mode is features")
  elif c.text_mode == "token_ids" and not (c.tokenizer_dir or c.text_encoder_dir):
    problems.append("set tokenizer_dir (or text_encoder_dir) for text_mode token_ids")
  if c.system_prompt != "auto" and c.system_prompt not in text_lib.SYSTEM_PROMPTS:
    problems.append(f"system_prompt {c.system_prompt!r} is not 'auto' or one of "
                    f"{sorted(text_lib.SYSTEM_PROMPTS)}")
  if c.max_length < 8 or c.max_length % text_lib.PAD_MULTIPLE:
    problems.append(f"max_length {c.max_length} must be a positive multiple of "
                    f"{text_lib.PAD_MULTIPLE}")
  if c.shard_compression not in records.COMPRESSIONS:
    problems.append(f"shard_compression {c.shard_compression!r} is not one of "
                    f"{sorted(records.COMPRESSIONS)}")
  for name in ("resolution", "batch_size", "records_per_shard", "min_side", "num_threads"):
    if int(c[name]) < 1:
      problems.append(f"{name} must be >= 1, got {c[name]}")
  if c.output_dtype != "bfloat16":
    problems.append(f"output_dtype {c.output_dtype!r}: record schema v{records.SCHEMA_VERSION} "
                    "stores floats as bfloat16 only")
  if (c.process_index < 0) != (c.process_count < 0):
    problems.append("set both process_index and process_count, or neither (-1)")
  elif c.process_count >= 0 and not 0 <= c.process_index < c.process_count:
    problems.append(f"process_index {c.process_index} not in [0, {c.process_count})")
  if problems:
    raise ValueError("precompute config: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------
# Inputs


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
    items = list(items)
    h = hashlib.sha256()
    for it in items:
      h.update(it.key.encode("utf-8", "backslashreplace") + b"\0")
    return cls(items.__getitem__, len(items), "keys-sha256:" + h.hexdigest())


def _caption_and_prompt(obj: dict, system_prompt: str) -> tuple[Any, str]:
  caption, prompt = text_lib.training_caption(obj)
  if system_prompt != "auto":
    prompt = text_lib.SYSTEM_PROMPTS[system_prompt]
  return caption, prompt


def read_jsonl(path: str, system_prompt: str = "auto") -> list[Item]:
  """Items of an official training jsonl (see the module docstring)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"input jsonl {path} does not exist")
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
    try:
      caption, prompt = _caption_and_prompt(obj, system_prompt)
    except ValueError as e:
      items.append(Item(rel, error=f"bad jsonl line {where}: {e}"))
      continue
    items.append(Item(rel, os.path.join(root, rel), caption, prompt))
  return items


def read_folder(folder: str, system_prompt: str = "auto") -> list[Item]:
  """Image files of a folder (sorted, recursive) with same-name `.txt` captions."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"input folder {folder} does not exist")
  prompt = text_lib.SYSTEM_PROMPTS["base" if system_prompt == "auto" else system_prompt]
  items = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for fname in sorted(files):
      if not fname.lower().endswith(IMAGE_EXTENSIONS):
        continue
      path = os.path.join(root, fname)
      key = os.path.relpath(path, folder)
      txt = os.path.splitext(path)[0] + ".txt"
      if not os.path.isfile(txt):
        items.append(Item(key, error=f"missing caption file {os.path.relpath(txt, folder)}"))
        continue
      try:
        with open(txt, encoding="utf-8") as f:
          caption = f.read().strip()
      except (OSError, UnicodeDecodeError) as e:
        items.append(Item(key, error=f"unreadable caption file ({e})"))
        continue
      items.append(Item(key, path, caption, prompt))
  items.sort(key=lambda it: it.key)
  return items


def read_tfds(name: str, split: str, data_dir: str = "", image_key: str = "image",
              caption_key: str = "caption", system_prompt: str = "auto") -> Inputs:
  """A prepared TFDS dataset through `tfds.data_source` (random access, no TensorFlow)."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("--input-format tfds needs tensorflow-datasets (`pip install "
                      "tensorflow-datasets`; TensorFlow itself is not needed)") from e
  source = tfds.data_source(name, split=split, data_dir=data_dir or None)
  prompt = text_lib.SYSTEM_PROMPTS["base" if system_prompt == "auto" else system_prompt]

  def get(i: int) -> Item:
    key = f"{name}/{split}[{i}]"
    try:
      ex = source[i]
    except Exception as e:  # a record that cannot be read or decoded is one bad input
      return Item(key, error=f"unreadable tfds example ({type(e).__name__}: {e})")
    missing = [k for k in (image_key, caption_key) if k not in ex]
    if missing:
      return Item(key, error=f"tfds example has no {missing} (features {sorted(ex)})")
    caption = ex[caption_key]
    if isinstance(caption, bytes):
      try:
        caption = caption.decode("utf-8")
      except UnicodeDecodeError:
        return Item(key, error="caption is not UTF-8 text")
    return Item(key, ex[image_key], caption, prompt)

  return Inputs(get, len(source), f"tfds:{name}/{split}:{len(source)}")


def list_inputs(source: str, input_format: str, cfg: ml_collections.ConfigDict) -> Inputs:
  """The ordered inputs of `source` in `input_format` (jsonl | folder | tfds)."""
  if input_format == "jsonl":
    return Inputs.from_items(read_jsonl(source, cfg.system_prompt))
  if input_format == "folder":
    return Inputs.from_items(read_folder(source, cfg.system_prompt))
  if input_format == "tfds":
    return read_tfds(source, cfg.tfds_split, cfg.tfds_data_dir, cfg.tfds_image_key,
                     cfg.tfds_caption_key, cfg.system_prompt)
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
    import io
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
  return caption


@dataclasses.dataclass
class Loaded:
  item: Item
  crop: np.ndarray  # uint8 [h, w, 3]
  bucket: tuple[int, int]  # latent units (rows, cols)
  orig_size: tuple[int, int]  # (w, h) pixels
  conversion: str


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
      rgb, conversion = Image.fromarray(src), "none"
    else:
      rgb, info = images_lib.open_rgb(src, min_size=cfg.min_side)
      w, h, conversion = info.width, info.height, info.conversion
  except images_lib.BadImageError as e:
    raise BadInput(e.reason) from None
  bucket_list = buckets_lib.buckets_for_resolution(cfg.resolution, patch_size, cfg.max_ratio)
  crop, (bw, bh) = buckets_lib.bucket_crop(rgb, bucket_list)
  crop = np.asarray(crop, np.uint8).reshape(bh, bw, 3)
  return Loaded(item, crop, buckets_lib.latent_hw((bw, bh), patch_size), (w, h), conversion)


# ----------------------------------------------------------------------------------------------
# Text


def text_pad_length(longest: int, max_length: int) -> int:
  """Static padded lengths 8, 16, 32, ... (capped at max_length): few compiles of the encoder."""
  n = text_lib.PAD_MULTIPLE
  while n < longest:
    n *= 2
  return min(n, max_length)


def text_fingerprint(cfg: ml_collections.ConfigDict) -> str:
  """The manifest's `text_encoder` fingerprint: files, layer, max length, prompt rule, mode."""
  from svg_jax.autoencoder import path_fingerprint

  tok_dir = cfg.tokenizer_dir or cfg.text_encoder_dir
  parts = [f"tokenizer={path_fingerprint(tok_dir)}"]
  if cfg.text_mode == "features":
    parts.insert(0, f"model={path_fingerprint(cfg.text_encoder_dir)}")
    parts.append(f"layer={cfg.hidden_layer}")
  parts += [f"max_length={cfg.max_length}", f"system_prompt={cfg.system_prompt}",
            f"mode={cfg.text_mode}"]
  return ";".join(parts)


def expected_fingerprints(config: ml_collections.ConfigDict) -> dict[str, str]:
  """The fingerprints a dataset precomputed with `config` carries, computed from the files alone
  (no model is loaded): what a trainer passes to `pipeline.make_pipeline(expected_fingerprints=)`
  to refuse data made with other weights, statistics or text settings."""
  from svg_jax.autoencoder import config_fingerprints

  cfg = config.precompute if "precompute" in config else precompute_defaults()
  return {**config_fingerprints(config.autoencoder), "text_encoder": text_fingerprint(cfg)}


class TextSide:
  """Tokenizer (+ Gemma-2 in features mode): full texts -> per-caption arrays and lengths."""

  def __init__(self, cfg: ml_collections.ConfigDict, encoder: Any = None, tokenizer: Any = None):
    self.cfg = cfg
    self.mode = cfg.text_mode
    if encoder is None and self.mode == "features":
      encoder = text_lib.TextEncoder.from_pretrained(
          cfg.text_encoder_dir, cfg.tokenizer_dir or None, hidden_layer=cfg.hidden_layer,
          max_length=cfg.max_length, feature_dtype="bfloat16", system_prompt="")
    self.encoder = encoder
    if tokenizer is None:
      tokenizer = (encoder.tokenizer if encoder is not None else
                   text_lib.load_tokenizer(cfg.tokenizer_dir or cfg.text_encoder_dir))
    self.tokenizer = tokenizer
    self.dim = None if encoder is None else int(encoder.cfg.hidden_size)

  def fingerprint(self) -> str:
    return text_fingerprint(self.cfg)

  def encode(self, texts: Sequence[str], batch_size: int) -> list[np.ndarray]:
    """Texts (system prompt already in front) -> one array per text at its valid length:
    bf16 [len, D] features or int32 [len] ids."""
    n = len(texts)
    rows = list(texts) + [text_lib.UNCONDITIONAL] * (-n % batch_size)  # fixed batch shapes
    out = []
    for start in range(0, len(rows), batch_size):
      part = rows[start:start + batch_size]
      ids, mask = text_lib.tokenize(self.tokenizer, part, "", self.cfg.max_length)
      lens = mask.sum(1)
      pad = text_pad_length(ids.shape[1], self.cfg.max_length)
      if pad != ids.shape[1]:
        ids, mask = text_lib.tokenize(self.tokenizer, part, "", self.cfg.max_length, pad_to=pad)
      if self.mode == "features":
        feats, _ = self.encoder.encode_tokens(ids, mask)
        feats = np.asarray(feats)
        out += [feats[i, :lens[i]] for i in range(len(part))]
      else:
        out += [ids[i, :lens[i]] for i in range(len(part))]
    return out[:n]

  def empty_text(self) -> np.ndarray:
    """The unconditional caption "" (<bos> only): [1, D] float32 (bf16 values) or [1] int32."""
    arr = self.encode([text_lib.UNCONDITIONAL], 1)[0]
    return arr.astype(np.float32) if self.mode == "features" else arr.astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Progress


class Progress:
  """One self-overwriting status line on stderr: done / total, items/s, ETA."""

  def __init__(self, total: int, stream=None, min_interval: float = 0.5):
    self.total, self.done, self.good = total, 0, 0
    self.stream = stream or sys.stderr
    self.start = self._last = time.perf_counter()
    self.min_interval = min_interval

  def update(self, done: int = 0, good: int = 0) -> None:
    self.done += done
    self.good += good
    now = time.perf_counter()
    if now - self._last >= self.min_interval or self.done >= self.total:
      self._last = now
      self.stream.write("\r" + self.line() + ("\n" if self.done >= self.total else ""))
      self.stream.flush()

  def line(self) -> str:
    elapsed = time.perf_counter() - self.start
    rate = self.done / elapsed if elapsed > 0 else 0.0
    eta = (self.total - self.done) / rate if rate > 0 else math.inf
    width = 24
    fill = width * self.done // max(self.total, 1)
    return (f"[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} inputs "
            f"{rate:.2f}/s elapsed {_hms(elapsed)} ETA {_hms(eta)}")


def _hms(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  s = int(round(seconds))
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ----------------------------------------------------------------------------------------------
# The job


def _atomic_json(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _chunk_file(out: str, c: int) -> str:
  return os.path.join(out, PROGRESS_DIR, f"chunk-{c:06d}.json")


def _chunk_prefix(c: int) -> str:
  return f"c{c:06d}-"


class Precomputer:
  """Runs the job of one process (see the module docstring).

  ae: an `SVGAutoencoder` with its encoder (its `batch_size`, mesh and fingerprints are used).
  text_side: a `TextSide`. cfg: a `precompute_defaults()` section.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, ae: Any, text_side: TextSide, *,
               process_index: int | None = None, process_count: int | None = None,
               stream=None):
    validate_config(cfg)
    self.cfg, self.ae, self.text = cfg, ae, text_side
    if process_index is None:
      process_index = cfg.process_index if cfg.process_index >= 0 else None
      process_count = cfg.process_count if cfg.process_count >= 0 else None
    if process_index is None or process_count is None:
      import jax
      process_index, process_count = jax.process_index(), jax.process_count()
    self.process_index, self.process_count = process_index, process_count
    self.stream = stream or sys.stdout
    self.patch_size = ae.encoder_cfg.patch_size
    self.fingerprints = {"encoder": ae.fingerprints.get("encoder", "unknown"),
                         "statistics": ae.fingerprints["statistics"],
                         "text_encoder": text_side.fingerprint()}
    self.text_layout = ({"kind": "text_features", "dim": text_side.dim}
                        if text_side.mode == "features" else {"kind": "token_ids", "dim": None})

  def _print(self, msg: str) -> None:
    print(msg, file=self.stream, flush=True)

  # -- plan

  def _plan(self, inputs: Inputs) -> dict:
    c = self.cfg
    return {"inputs": inputs.fingerprint, "num_inputs": len(inputs),
            "records_per_shard": int(c.records_per_shard), "resolution": int(c.resolution),
            "max_ratio": float(c.max_ratio), "min_side": int(c.min_side),
            "fingerprints": self.fingerprints, "text": self.text_layout,
            "latent_channels": int(self.ae.encoder_cfg.dim),
            "schema_version": records.SCHEMA_VERSION}

  def _check_plan(self, out: str, plan: dict) -> None:
    path = os.path.join(out, PROGRESS_DIR, PLAN_FILE)
    if os.path.isfile(path):
      with open(path) as f:
        old = json.load(f)
      if old != plan:
        diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
        raise ValueError(f"{out} holds a precompute run with a different plan (differs in "
                         f"{diff}); use another output folder or delete it")
    else:
      if os.path.exists(os.path.join(out, records.MANIFEST_NAME)):
        raise FileExistsError(f"{out} holds a dataset not written by this precompute "
                              f"(no {PROGRESS_DIR}/{PLAN_FILE}); use another output folder")
      os.makedirs(os.path.join(out, PROGRESS_DIR), exist_ok=True)
      _atomic_json(path, plan)

  # -- one chunk

  def _flush(self, writer: records.DatasetWriter, group: list[Loaded], stats: dict) -> None:
    crops = np.stack([g.crop for g in group])
    latents = self.ae.encode(crops)
    texts = [g.item.system_prompt + g.item.caption for g in group]
    text_arrays = self.text.encode(texts, self.cfg.batch_size)
    text_name = "text_features" if self.text.mode == "features" else "token_ids"
    for g, z, t in zip(group, latents, text_arrays):
      writer.add({"latent": z, "caption": g.item.caption, text_name: t, "text_len": int(t.shape[0]),
                  "bucket": g.bucket, "orig_size": g.orig_size, "source": g.item.key})
      hist = stats["text_len_histogram"]
      hist[str(t.shape[0])] = hist.get(str(t.shape[0]), 0) + 1

  def run_chunk(self, inputs: Inputs, c: int, out: str, progress: Progress) -> dict:
    """Processes chunk c from scratch and marks it done; returns its done-file content."""
    n = int(self.cfg.records_per_shard)
    indices = range(c * n, min(len(inputs), (c + 1) * n))
    for stale in glob.glob(os.path.join(out, _chunk_prefix(c) + "*")):
      os.remove(stale)
    for stale in glob.glob(os.path.join(out, PROGRESS_DIR, f"chunk-{c:06d}.tmp-*")):
      shutil.rmtree(stale, ignore_errors=True)  # scratch of a killed run
    scratch = os.path.join(out, PROGRESS_DIR, f"chunk-{c:06d}.tmp-{os.getpid()}")
    stats = {"text_len_histogram": {}, "conversions": [], "bad_inputs": []}
    pending: dict[tuple[int, int], list[Loaded]] = {}

    def load(i: int):
      item = inputs[i]
      try:
        return load_item(item, self.cfg, self.patch_size)
      except BadInput as e:
        return item.key, e.reason

    writer = records.DatasetWriter(scratch, fingerprints=self.fingerprints, records_per_shard=n,
                                   compression=self.cfg.shard_compression)
    try:
      # Decoded crops are held only for a window of inputs (memory stays bounded at 1024 px).
      window = max(4 * int(self.cfg.batch_size), 4 * int(self.cfg.num_threads))
      with concurrent.futures.ThreadPoolExecutor(self.cfg.num_threads) as pool:
        results = (r for s in range(0, len(indices), window)
                   for r in pool.map(load, indices[s:s + window]))
        for result in results:
          if isinstance(result, tuple):
            key, reason = result
            writer.report_bad(key, reason)
            stats["bad_inputs"].append({"key": key, "reason": reason})
            progress.update(done=1)
            continue
          if result.conversion != "none":
            stats["conversions"].append({"key": result.item.key, "kind": result.conversion})
          group = pending.setdefault(result.bucket, [])
          group.append(result)
          if len(group) >= self.cfg.batch_size:
            self._flush(writer, group, stats)
            progress.update(done=len(group), good=len(group))
            pending[result.bucket] = []
      for bucket in sorted(pending):
        if pending[bucket]:
          self._flush(writer, pending[bucket], stats)
          progress.update(done=len(pending[bucket]), good=len(pending[bucket]))
      manifest = writer.close()
    except BaseException:
      writer.__exit__(*sys.exc_info())
      shutil.rmtree(scratch, ignore_errors=True)
      raise
    shards = []
    for s in manifest["shards"]:
      name = f"{_chunk_prefix(c)}p{self.process_index:03d}-{s['name']}"
      os.replace(os.path.join(scratch, s["name"]), os.path.join(out, name))
      shards.append({"name": name, "bucket": s["bucket"], "num_records": s["num_records"]})
    done = {"chunk": c, "process_index": self.process_index, "num_inputs": len(indices),
            "shards": shards, **stats}
    _atomic_json(_chunk_file(out, c), done)
    shutil.rmtree(scratch, ignore_errors=True)
    return done

  # -- the whole job

  def num_chunks(self, inputs: Inputs) -> int:
    return -(-len(inputs) // int(self.cfg.records_per_shard))

  def run(self, inputs: Inputs, out: str) -> dict | None:
    """Processes this process's unfinished chunks; writes the manifest when every chunk is done
    (returns it), else returns None (another process will)."""
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    self._check_plan(out, self._plan(inputs))
    mine = [c for c in range(self.num_chunks(inputs))
            if c % self.process_count == self.process_index]
    todo = [c for c in mine if not self._chunk_done(out, c)]
    n = int(self.cfg.records_per_shard)
    total = sum(min(len(inputs), (c + 1) * n) - c * n for c in todo)
    self._print(f"precompute: {len(inputs)} inputs in {self.num_chunks(inputs)} chunks; process "
                f"{self.process_index}/{self.process_count} has {len(mine)} chunks, "
                f"{len(mine) - len(todo)} already done, {total} inputs to do")
    progress = Progress(total, stream=sys.stderr)
    start = time.perf_counter()
    for c in todo:
      self.run_chunk(inputs, c, out, progress)
    elapsed = time.perf_counter() - start
    self.images_per_second = progress.good / elapsed if elapsed > 0 and progress.good else 0.0
    self._print(f"precompute: {progress.good} images encoded in {elapsed:.1f} s: "
                f"{self.images_per_second:.2f} images/s ({progress.done - progress.good} bad)")
    if not all(self._chunk_done(out, c) for c in range(self.num_chunks(inputs))):
      self._print("precompute: other processes still have chunks to do; the last one to finish "
                  "writes manifest.json")
      return None
    manifest = self.finalize(inputs, out)
    self._print(summary(manifest))
    return manifest

  def _chunk_done(self, out: str, c: int) -> bool:
    path = _chunk_file(out, c)
    if not os.path.isfile(path):
      return False
    with open(path) as f:
      done = json.load(f)
    # A done chunk whose shards went missing is redone.
    return all(os.path.isfile(os.path.join(out, s["name"])) for s in done["shards"])

  def finalize(self, inputs: Inputs, out: str) -> dict:
    """Merges the chunk files into manifest.json and writes empty_text.npy; returns the manifest."""
    shards, bad, conversions, hist = [], [], [], {}
    for c in range(self.num_chunks(inputs)):
      with open(_chunk_file(out, c)) as f:
        done = json.load(f)
      shards += done["shards"]
      bad += done["bad_inputs"]
      conversions += done["conversions"]
      for k, v in done["text_len_histogram"].items():
        hist[k] = hist.get(k, 0) + v
    counts: dict[str, int] = {}
    for s in shards:
      counts[s["bucket"]] = counts.get(s["bucket"], 0) + s["num_records"]
    kinds: dict[str, dict] = {}
    for conv in conversions:
      entry = kinds.setdefault(conv["kind"], {"count": 0, "examples": []})
      entry["count"] += 1
      if len(entry["examples"]) < MAX_CONVERSION_EXAMPLES:
        entry["examples"].append(conv["key"])
    empty = self.text.empty_text()
    tmp = os.path.join(out, f".{EMPTY_TEXT_FILE}.tmp-{os.getpid()}.npy")
    np.save(tmp, empty)
    os.replace(tmp, os.path.join(out, EMPTY_TEXT_FILE))
    c = self.cfg
    manifest = {
        "schema_version": records.SCHEMA_VERSION,
        "num_records": sum(counts.values()),
        "buckets": dict(sorted(counts.items())),
        "shards": shards,
        "fingerprints": self.fingerprints,
        "text": self.text_layout,
        "latent_channels": int(self.ae.encoder_cfg.dim),
        "bad_inputs": bad,
        "num_inputs": len(inputs),
        "conversions": kinds,
        "text_len_histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
        "empty_text": {"file": EMPTY_TEXT_FILE, "shape": list(empty.shape),
                       "dtype": str(empty.dtype), "caption": text_lib.UNCONDITIONAL},
        "precompute": {"resolution": int(c.resolution), "max_ratio": float(c.max_ratio),
                       "patch_size": int(self.patch_size), "max_length": int(c.max_length),
                       "system_prompt": c.system_prompt, "text_mode": c.text_mode,
                       "hidden_layer": int(c.hidden_layer), "min_side": int(c.min_side),
                       "records_per_shard": int(c.records_per_shard),
                       "shard_compression": c.shard_compression,
                       "bf16_stats": bool(self.ae.bf16_stats)},
    }
    records.write_manifest(out, manifest)
    return manifest


def summary(manifest: dict, max_lines: int = 50) -> str:
  """The console summary: records per bucket, conversions, every bad input (up to max_lines)."""
  lines = [f"precompute: {manifest['num_records']} records from {manifest['num_inputs']} inputs "
           f"in {len(manifest['shards'])} shards; buckets (rows x cols in latent units): "
           + ", ".join(f"{k}: {v}" for k, v in manifest["buckets"].items())]
  for kind, entry in sorted(manifest["conversions"].items()):
    lines.append(f"  converted ({kind}): {entry['count']}, e.g. {', '.join(entry['examples'][:3])}")
  bad = manifest["bad_inputs"]
  lines.append(f"  bad inputs: {len(bad)}")
  lines += [f"  bad input {b['key']}: {b['reason']}" for b in bad[:max_lines]]
  if len(bad) > max_lines:
    lines.append(f"  ... and {len(bad) - max_lines} more (all in manifest.json)")
  return "\n".join(lines)


def build(config: ml_collections.ConfigDict, *, stream=None) -> Precomputer:
  """Loads the encoder (batch sharded over this process's local devices) and the text side."""
  import jax

  from svg_jax import autoencoder, parallel

  cfg = config.precompute if "precompute" in config else precompute_defaults()
  validate_config(cfg)
  ae_cfg = ml_collections.ConfigDict(config.autoencoder.to_dict())
  ae_cfg.batch_size = int(cfg.batch_size)
  mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())
  ae = autoencoder.SVGAutoencoder.from_config(ae_cfg, decoder=False, mesh=mesh)
  return Precomputer(cfg, ae, TextSide(cfg), stream=stream)


def bf16_round(x: Any) -> np.ndarray:
  """float32 values of x rounded to bf16 (the precision records store)."""
  return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
