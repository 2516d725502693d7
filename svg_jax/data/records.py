"""The precomputed-feature record format: schema, (de)serialization, ArrayRecord shards, manifest.

One record per image (SCHEMA_VERSION 1):

  latent        [h, w, C] bfloat16   normalized DINOv3 latent (h, w in latent units = pixels / 16)
  caption       str                  the caption text (without system prompt)
  text_features [L, D] bfloat16      text-encoder hidden states            } exactly one of
  token_ids     [L] int32            tokenizer ids (text encoder run online) } the two
  text_len      int                  valid text length, 1 <= text_len <= L
  bucket        (h, w)               aspect bucket in latent units; must equal latent.shape[:2]
  orig_size     (w, h)               original image size in pixels
  source        str                  source key (file name, url, dataset id)

Bytes on disk: msgpack of {"schema_version", "crc32", "body"}, where body is the msgpack of the
fields and each array is {"dtype": name, "shape": [...], "data": little-endian raw bytes}. No
pickle, no TensorFlow. The crc32 over body catches bit rot that msgpack framing alone would not,
wherever the bytes are kept. Inside shards every record is its own Riegeli chunk (group_size 1),
whose HighwayHash ArrayRecord checks on each read, so the training loader skips the crc32 (it was
three quarters of the decode time, bench/loader.py).

A dataset directory holds one or more ArrayRecord shards per bucket (a shard never mixes buckets, so
the loader can build one stream per bucket from the manifest alone) and `manifest.json` with the
schema version, record counts per bucket and per shard, the fingerprints of the encoder, its
normalization statistics and the text encoder, the text layout, and the bad-input report of the
precompute job. Synthetic datasets in this schema: `data/synthetic.py`.
"""
from __future__ import annotations

import json
import math
import os
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_dtypes
import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from svg_jax.data import msgpack_view
from svg_jax.input_errors import InputError
from svg_jax.utils import atomic_files

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".array_record"
# group_size 1 gives O(1) random access, which the loader's shuffled reads rely on. Compression:
# "uncompressed" (the default) reads ~2x faster than "zstd" (ArrayRecord's own default, zstd:3),
# which makes shards ~22% smaller; with zstd the loader needs about twice the cores to stay 10x
# ahead of an 8-GPU host (bench/loader.py). Readers take either without being told.
COMPRESSIONS = {"uncompressed": ",uncompressed", "zstd": ""}
DEFAULT_COMPRESSION = "uncompressed"


def writer_options(compression: str = DEFAULT_COMPRESSION) -> str:
  if compression not in COMPRESSIONS:
    raise ValueError(f"unknown shard compression {compression!r}; expected one of "
                     f"{sorted(COMPRESSIONS)}")
  return "group_size:1" + COMPRESSIONS[compression]

REQUIRED_FIELDS = ("latent", "caption", "text_len", "bucket", "orig_size", "source")
TEXT_FIELDS = ("text_features", "token_ids")
ALL_FIELDS = REQUIRED_FIELDS + TEXT_FIELDS
FINGERPRINT_KEYS = ("encoder", "statistics", "text_encoder")

_DTYPES = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype("<f4"),
    "int32": np.dtype("<i4"),
}
# Storage dtype and rank of every array field.
_ARRAY_FIELDS = {
    "latent": ("bfloat16", 3), "text_features": ("bfloat16", 2), "token_ids": ("int32", 1)}


class BadRecordError(ValueError):
  """A record that cannot be encoded or decoded; the message names the problem."""


class CorruptShardError(InputError, OSError):
  """A shard file that is missing, unreadable or disagrees with the manifest (bad input: one
  line, exit 2, in the scripts)."""


class ManifestError(ValueError):
  """A missing or malformed manifest.json."""


class FingerprintMismatchError(InputError):
  """The dataset was built with a different encoder / statistics / text encoder than expected."""


def bucket_key(bucket: Sequence[int]) -> str:
  """Manifest key of an (h, w) bucket in latent units: "{h}x{w}" (rows first)."""
  h, w = bucket
  return f"{int(h)}x{int(w)}"


def parse_bucket_key(key: str) -> tuple[int, int]:
  try:
    h, w = key.split("x")
    return int(h), int(w)
  except ValueError:
    raise ManifestError(f"bad bucket key {key!r}; expected '<h>x<w>'") from None


# ----------------------------------------------------------------------------- records


def _pack_array(name: str, value: Any) -> dict:
  dtype_name, ndim = _ARRAY_FIELDS[name]
  arr = np.asarray(value)
  if arr.ndim != ndim:
    raise BadRecordError(f"{name}: expected {ndim} dims, got shape {arr.shape}")
  if dtype_name == "int32":
    if not np.issubdtype(arr.dtype, np.integer):
      raise BadRecordError(f"{name}: expected integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
      raise BadRecordError(f"{name}: values outside the int32 range")
  else:
    if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype == _DTYPES["bfloat16"]):
      raise BadRecordError(f"{name}: expected floats, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr.astype(np.float32))):
      raise BadRecordError(f"{name}: contains NaN or Inf")
  arr = np.ascontiguousarray(arr.astype(_DTYPES[dtype_name]))
  return {"dtype": dtype_name, "shape": list(arr.shape), "data": arr.tobytes()}


def _unpack_array(name: str, packed: Any) -> np.ndarray:
  want_dtype, ndim = _ARRAY_FIELDS[name]
  if not isinstance(packed, dict) or set(packed) != {"dtype", "shape", "data"}:
    raise BadRecordError(f"{name}: expected an array entry with dtype/shape/data")
  dtype_name, shape, data = packed["dtype"], packed["shape"], packed["data"]
  if dtype_name != want_dtype:
    raise BadRecordError(f"{name}: dtype {dtype_name!r}, schema says {want_dtype!r}")
  if (not isinstance(shape, list) or len(shape) != ndim
      or not all(isinstance(s, int) and s >= 0 for s in shape)):
    raise BadRecordError(f"{name}: bad shape {shape!r}; expected {ndim} non-negative ints")
  if not isinstance(data, (bytes, memoryview)):
    raise BadRecordError(f"{name}: data is not bytes")
  dtype = _DTYPES[dtype_name]
  need = math.prod(shape) * dtype.itemsize
  if len(data) != need:
    raise BadRecordError(
        f"{name}: {len(data)} data bytes but shape {shape} of {dtype_name} needs {need}")
  return np.frombuffer(data, dtype=dtype).reshape(shape)


def _check_int_pair(name: str, value: Any, positive: bool) -> tuple[int, int]:
  if (not isinstance(value, (list, tuple)) or len(value) != 2
      or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)):
    raise BadRecordError(f"{name}: expected a pair of ints, got {value!r}")
  a, b = int(value[0]), int(value[1])
  if (positive and (a < 1 or b < 1)) or a < 0 or b < 0:
    raise BadRecordError(f"{name}: values must be {'positive' if positive else '>= 0'}: {value!r}")
  return a, b


def _check_fields(fields: Mapping[str, Any]) -> None:
  keys = set(fields)
  missing = [k for k in REQUIRED_FIELDS if k not in keys]
  unexpected = sorted(keys - set(ALL_FIELDS))
  text = [k for k in TEXT_FIELDS if k in keys]
  problems = []
  if missing:
    problems.append(f"missing fields {missing}")
  if unexpected:
    problems.append(f"unexpected fields {unexpected}")
  if len(text) != 1:
    problems.append(f"need exactly one of {list(TEXT_FIELDS)}, got {text}")
  if problems:
    raise BadRecordError("; ".join(problems))


def _validate(rec: dict) -> dict:
  """Checks field types and the cross-field shape rules; returns the normalized record."""
  latent = rec["latent"]
  if min(latent.shape) < 1:
    raise BadRecordError(f"latent: empty shape {latent.shape}")
  text_name = "text_features" if "text_features" in rec else "token_ids"
  text = rec[text_name]
  length = text.shape[0]
  if text_name == "text_features" and text.shape[1] < 1:
    raise BadRecordError(f"text_features: empty feature dim in shape {text.shape}")
  text_len = rec["text_len"]
  if not isinstance(text_len, (int, np.integer)) or isinstance(text_len, bool):
    raise BadRecordError(f"text_len: expected an int, got {text_len!r}")
  if not 1 <= int(text_len) <= length:
    raise BadRecordError(
        f"text_len {text_len} outside [1, {length}] ({text_name} has {length} rows)")
  bucket = _check_int_pair("bucket", rec["bucket"], positive=True)
  if bucket != tuple(latent.shape[:2]):
    raise BadRecordError(f"bucket {bucket} does not match latent shape {tuple(latent.shape)}")
  orig_size = _check_int_pair("orig_size", rec["orig_size"], positive=True)
  for name in ("caption", "source"):
    if not isinstance(rec[name], str):
      raise BadRecordError(f"{name}: expected str, got {type(rec[name]).__name__}")
  if not rec["source"]:
    raise BadRecordError("source: empty key")
  out = dict(rec)
  out.update(text_len=int(text_len), bucket=bucket, orig_size=orig_size)
  return out


def encode_record(record: Mapping[str, Any]) -> bytes:
  """Serializes one record (fields as in the module docstring). Float arrays are stored as bf16."""
  if not isinstance(record, Mapping):
    raise BadRecordError(f"record must be a mapping, got {type(record).__name__}")
  _check_fields(record)
  rec = dict(record)
  packed = {name: _pack_array(name, rec[name]) for name in _ARRAY_FIELDS if name in rec}
  for name, entry in packed.items():
    rec[name] = _unpack_array(name, entry)
  rec = _validate(rec)
  body_fields = {name: packed.get(name, value) for name, value in rec.items()}
  body_fields["bucket"] = list(rec["bucket"])
  body_fields["orig_size"] = list(rec["orig_size"])
  try:
    body = msgpack.packb(body_fields, use_bin_type=True)
  except (UnicodeEncodeError, TypeError, ValueError, OverflowError) as e:
    # A str msgpack cannot store: one with lone surrogates (a non-UTF-8 file name read by Python).
    raise BadRecordError(f"cannot serialize the record ({type(e).__name__}: {e})") from None
  return msgpack.packb(
      {"schema_version": SCHEMA_VERSION, "crc32": zlib.crc32(body), "body": body},
      use_bin_type=True)


def _unpackb(data: bytes | memoryview, what: str) -> Any:
  """msgpack-decodes `data` with its bins as views (no copies); errors come from msgpack itself."""
  try:
    return msgpack_view.unpack(data)
  except ValueError:
    pass  # outside the zero-copy subset or invalid: msgpack decides, and names the problem
  try:
    return msgpack.unpackb(data, raw=False, strict_map_key=True)
  except msgpack.ExtraData:
    raise BadRecordError(f"{what}: trailing bytes after the msgpack object") from None
  except (ValueError, msgpack.UnpackException, TypeError) as e:
    raise BadRecordError(f"{what}: not valid msgpack, truncated or corrupt ({e})") from None


def decode_record(data: bytes, verify_crc: bool = True) -> dict:
  """Parses and validates one record; raises BadRecordError with the reason on any problem.

  Arrays in the result are read-only numpy views of `data`, not copies (latent bf16, text bf16
  / int32); `bucket` and `orig_size` are tuples. verify_crc=False only for bytes a checksummed
  store has already verified (an ArrayRecord shard's reader).
  """
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise BadRecordError(f"record must be bytes, got {type(data).__name__}")
  outer = _unpackb(bytes(data), "record")
  if not isinstance(outer, dict):
    raise BadRecordError(f"record: expected a msgpack map, got {type(outer).__name__}")
  version = outer.get("schema_version")
  if version != SCHEMA_VERSION:
    raise BadRecordError(f"wrong schema version {version!r} (this code reads {SCHEMA_VERSION})")
  if set(outer) != {"schema_version", "crc32", "body"}:
    raise BadRecordError(f"record: bad envelope keys {sorted(outer)}")
  body = outer["body"]
  if not isinstance(body, (bytes, memoryview)):
    raise BadRecordError("record: body is not bytes")
  if verify_crc and zlib.crc32(body) != outer["crc32"]:
    raise BadRecordError("record: crc32 mismatch (corrupted bytes)")
  fields = _unpackb(body, "record body")
  if not isinstance(fields, dict):
    raise BadRecordError("record body: expected a msgpack map")
  _check_fields(fields)
  rec = dict(fields)
  for name in _ARRAY_FIELDS:
    if name in rec:
      rec[name] = _unpack_array(name, rec[name])
  return _validate(rec)


# ----------------------------------------------------------------------------- shards


# Riegeli (under ArrayRecord) words a refused write as "write() failed: File too large; writing
# <path>; at byte <n>; ...", a RuntimeError: the reason is the C library's strerror text.
_RIEGELI_OS_REASON = re.compile(r"\w+\(\) failed: ([^;]+)")
_ERRNO_OF_REASON = {os.strerror(n): n for n in range(1, 200)}


def shard_write_error(error: RuntimeError, path: str) -> OSError:
  """ArrayRecord's RuntimeError for a write the file system refused, as the OSError it stands
  for (errno and reason when the message names them, `path` its file)."""
  message = " ".join(str(error).split())
  match = _RIEGELI_OS_REASON.search(message)
  reason = match.group(1).strip() if match else ""
  if reason in _ERRNO_OF_REASON:
    return OSError(_ERRNO_OF_REASON[reason], reason, path)
  return OSError(f"could not write {path}: {message}")


class ShardWriter:
  """Writes one ArrayRecord shard atomically: records go to a temporary name, renamed on close.

  Used as a context manager; on an exception the temporary file is removed and nothing appears
  under `path`.
  """

  def __init__(self, path: str | os.PathLike, compression: str = DEFAULT_COMPRESSION):
    self.path = os.fspath(path)
    options = writer_options(compression)
    self._tmp = f"{self.path}.tmp-{os.getpid()}"
    self._writer = ArrayRecordWriter(self._tmp, options)
    if not self._writer.ok():
      raise CorruptShardError(f"cannot open {self._tmp} for writing")
    self.num_records = 0

  def write(self, record: bytes) -> None:
    if self._writer is None:
      raise ValueError(f"shard {self.path} is already closed")
    try:
      self._writer.write(record)
    except RuntimeError as e:
      raise shard_write_error(e, self._tmp) from e
    self.num_records += 1

  def close(self) -> None:
    """Flushes and renames the shard; a write the file system refuses (the writer buffers, so a
    full disk shows here) is an OSError and removes the temporary file."""
    if self._writer is None:
      return
    # Taken first: a writer whose close failed raises the same error again when closed again.
    writer, self._writer = self._writer, None
    try:
      writer.close()
    except RuntimeError as e:
      self._remove_tmp()
      raise shard_write_error(e, self._tmp) from e
    os.replace(self._tmp, self.path)

  def abort(self) -> None:
    """Drops the shard. It runs while another error goes up: a failing close (a full disk) must
    neither hide that error nor leave the temporary file behind."""
    if self._writer is None:
      return
    writer, self._writer = self._writer, None
    try:
      writer.close()
    except RuntimeError:
      pass  # the bytes are dropped anyway
    self._remove_tmp()

  def _remove_tmp(self) -> None:
    if os.path.exists(self._tmp):
      os.remove(self._tmp)

  def __enter__(self) -> ShardWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


def open_shard(path: str | os.PathLike, expected_records: int | None = None) -> ArrayRecordReader:
  """Opens a shard for reading; raises CorruptShardError naming the file if it is unusable."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CorruptShardError(f"shard {path}: file does not exist")
  try:
    reader = ArrayRecordReader(path)
    ok, detail = reader.ok(), ""
  except Exception as e:  # the C++ reader's exception types are not part of its API
    ok, detail = False, f": {e}"
  # On garbage the reader usually does not raise: it reports !ok() (and close() then raises).
  if not ok:
    try:
      reader.close()
    except Exception as e:
      detail = detail or f": {e}"
    raise CorruptShardError(
        f"shard {path}: not a readable ArrayRecord file (corrupt or truncated){detail}")
  if expected_records is not None and reader.num_records() != expected_records:
    n = reader.num_records()
    reader.close()
    raise CorruptShardError(
        f"shard {path}: holds {n} records, the manifest says {expected_records}")
  return reader


def read_shard(path: str | os.PathLike) -> Iterator[bytes]:
  """Yields the raw records of a shard in order (decode them with `decode_record`)."""
  reader = open_shard(path)
  try:
    n = reader.num_records()
    for start in range(0, n, 256):
      yield from reader.read(range(start, min(n, start + 256)))
  finally:
    reader.close()


# ----------------------------------------------------------------------------- manifest


def validate_manifest(manifest: Mapping[str, Any]) -> None:
  """Raises ManifestError listing every structural problem of a manifest dict."""
  required = ("schema_version", "num_records", "buckets", "shards", "fingerprints", "text",
              "latent_channels", "bad_inputs")
  missing = [k for k in required if k not in manifest]
  if missing:
    raise ManifestError(f"manifest is missing keys {missing}")
  if manifest["schema_version"] != SCHEMA_VERSION:
    raise ManifestError(f"manifest schema version {manifest['schema_version']!r}, "
                        f"this code reads {SCHEMA_VERSION}")
  problems = []
  per_bucket: dict[str, int] = {}
  for i, shard in enumerate(manifest["shards"]):
    if not isinstance(shard, dict) or set(shard) != {"name", "bucket", "num_records"}:
      problems.append(f"shard entry {i} must have exactly name/bucket/num_records: {shard!r}")
      continue
    parse_bucket_key(shard["bucket"])
    if os.path.basename(shard["name"]) != shard["name"]:
      problems.append(f"shard name {shard['name']!r} must be a bare file name")
    per_bucket[shard["bucket"]] = per_bucket.get(shard["bucket"], 0) + shard["num_records"]
  if per_bucket != dict(manifest["buckets"]):
    problems.append(
        f"bucket counts {manifest['buckets']} disagree with the shard list {per_bucket}")
  if sum(per_bucket.values()) != manifest["num_records"]:
    problems.append(f"num_records {manifest['num_records']} != sum over shards "
                    f"{sum(per_bucket.values())}")
  text = manifest["text"]
  if not isinstance(text, dict) or text.get("kind") not in TEXT_FIELDS:
    problems.append(
        f"text must be {{'kind': one of {list(TEXT_FIELDS)}, 'dim': ...}}, got {text!r}")
  elif text["kind"] == "text_features" and not (
      isinstance(text.get("dim"), int) and text["dim"] > 0):
    problems.append(f"text.dim must be a positive int for text_features, got {text.get('dim')!r}")
  if not isinstance(manifest["fingerprints"], dict) or not all(
      isinstance(v, str) for v in manifest["fingerprints"].values()):
    problems.append("fingerprints must be a dict of strings")
  if problems:
    raise ManifestError("; ".join(problems))


def write_manifest(directory: str | os.PathLike, manifest: Mapping[str, Any]) -> str:
  """Validates and atomically writes `manifest.json` into `directory`; returns its path."""
  validate_manifest(manifest)
  path = os.path.join(os.fspath(directory), MANIFEST_NAME)
  atomic_files.write_json(path, manifest)
  return path


def read_manifest(directory: str | os.PathLike) -> dict:
  """Reads and validates `manifest.json` of a dataset directory."""
  path = os.path.join(os.fspath(directory), MANIFEST_NAME)
  if not os.path.isfile(path):
    raise ManifestError(f"{path}: no manifest (is this a precomputed dataset directory?)")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except json.JSONDecodeError as e:
    raise ManifestError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(manifest, dict):
    raise ManifestError(f"{path}: expected a JSON object")
  try:
    validate_manifest(manifest)
  except ManifestError as e:
    raise ManifestError(f"{path}: {e}") from None
  return manifest


def iter_records(directory: str | os.PathLike) -> Iterator[tuple[dict, dict]]:
  """(manifest shard entry, decoded record) for every record of a dataset, shard by shard in the
  manifest's order (the training loader reads through Grain; this is for tools and checks)."""
  directory = os.fspath(directory)
  for shard in read_manifest(directory)["shards"]:
    for raw in read_shard(os.path.join(directory, shard["name"])):
      yield shard, decode_record(raw)


def check_fingerprints(manifest: Mapping[str, Any], expected: Mapping[str, str]) -> None:
  """Raises FingerprintMismatchError naming each expected fingerprint that is missing or differs.

  Keys of `expected` are the ones checked (usually FINGERPRINT_KEYS); a None value is skipped.
  """
  have = manifest.get("fingerprints", {})
  problems = []
  for key, want in expected.items():
    if want is None:
      continue
    if key not in have:
      problems.append(f"{key}: dataset has no fingerprint (expected {want!r})")
    elif have[key] != want:
      # ":bf16" marks latents normalized with bf16-rounded statistics (autoencoder.bf16_stats).
      only_rounding = have[key].removesuffix(":bf16") == want.removesuffix(":bf16")
      problems.append(f"{key}: dataset {have[key]!r} != expected {want!r}" + (
          " (only autoencoder.bf16_stats differs)" if only_rounding else ""))
  if problems:
    raise FingerprintMismatchError(
        "dataset fingerprints do not match the config (precomputed with other "
        "models or normalization stats): " + "; ".join(problems))


class DatasetWriter:
  """Writes records into per-bucket shards of at most `records_per_shard` and the manifest.

  add() validates and routes each record; report_bad() records an input that could not be turned
  into a record (it goes into the manifest's bad-input report); close() finalizes the open shards
  and writes manifest.json, returning it. All records must share latent channels and text layout.
  """

  def __init__(self, directory: str | os.PathLike, *, fingerprints: Mapping[str, str] | None = None,
               records_per_shard: int = 1024, compression: str = DEFAULT_COMPRESSION):
    if records_per_shard < 1:
      raise ValueError("records_per_shard must be >= 1")
    writer_options(compression)  # an unknown compression fails before anything is written
    self.compression = compression
    self.directory = os.fspath(directory)
    os.makedirs(self.directory, exist_ok=True)
    if os.path.exists(os.path.join(self.directory, MANIFEST_NAME)):
      raise FileExistsError(f"{self.directory} already holds a dataset ({MANIFEST_NAME})")
    self.fingerprints = dict(fingerprints or {})
    self.records_per_shard = records_per_shard
    self._open: dict[str, ShardWriter] = {}
    self._shard_count: dict[str, int] = {}
    self._shards: list[dict] = []
    self._bad: list[dict] = []
    self._text: dict | None = None
    self._channels: int | None = None

  def _layout(self, rec: Mapping[str, Any]) -> None:
    channels = int(np.shape(rec["latent"])[-1])
    if "text_features" in rec:
      text = {"kind": "text_features", "dim": int(np.shape(rec["text_features"])[-1])}
    else:
      text = {"kind": "token_ids", "dim": None}
    if self._text is None:
      self._text, self._channels = text, channels
    elif text != self._text or channels != self._channels:
      raise BadRecordError(
          f"record {rec.get('source')!r}: layout {text}, {channels} latent channels differs from "
          f"the dataset's {self._text}, {self._channels} channels")

  def add(self, record: Mapping[str, Any]) -> None:
    """A BadRecordError (the record cannot be encoded or differs in layout) leaves the dataset
    as it was: nothing of the record is written."""
    data = encode_record(record)
    self._layout(record)
    key = bucket_key(record["bucket"])
    writer = self._open.get(key)
    if writer is None:
      idx = self._shard_count.get(key, 0)
      self._shard_count[key] = idx + 1
      name = f"{key}-{idx:05d}{SHARD_SUFFIX}"
      writer = self._open[key] = ShardWriter(os.path.join(self.directory, name),
                                             self.compression)
      self._shards.append({"name": name, "bucket": key, "num_records": 0})
    writer.write(data)
    entry = next(s for s in reversed(self._shards) if s["bucket"] == key)
    entry["num_records"] += 1
    if writer.num_records >= self.records_per_shard:
      writer.close()
      del self._open[key]

  def report_bad(self, key: str, reason: str) -> None:
    self._bad.append({"key": str(key), "reason": str(reason)})

  def close(self) -> dict:
    for writer in self._open.values():
      writer.close()
    self._open.clear()
    buckets: dict[str, int] = {}
    for s in self._shards:
      buckets[s["bucket"]] = buckets.get(s["bucket"], 0) + s["num_records"]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "num_records": sum(buckets.values()),
        "buckets": buckets,
        "shards": self._shards,
        "fingerprints": self.fingerprints,
        "text": self._text or {"kind": "text_features", "dim": 1},
        "latent_channels": self._channels or 0,
        "bad_inputs": self._bad,
    }
    write_manifest(self.directory, manifest)
    return manifest

  def __enter__(self) -> DatasetWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      for writer in self._open.values():
        writer.abort()
