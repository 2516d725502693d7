"""Grain input pipeline over ArrayRecord shards: aspect buckets, caption padding, resume.

Per aspect bucket (one MapDataset each, all latents in a batch share one shape):

  this process's examples -> their positions in the bucket's stream -> a new permutation per
    epoch -> read + decode -> batch(per-process batch size, drop_remainder) with captions padded
    to a length bucket

The bucket's stream is cut into global batches of `global batch size` consecutive positions; a
process reads the rows of each global batch that its devices hold (by default the contiguous block
`[p * b, (p + 1) * b)` of the per-process batch b). So which records form global batch k of a
bucket, and their order in it, depend on (seed, k, row) only, never on the number of processes:
1 process x 4 devices, 2 x 2 and 4 x 1 train on the same batches.

then a deterministic weighted mix of the batched buckets (Grain's `MapDataset.mix`: element k comes
from a bucket that is a pure function of k and the weights; weights default to the manifest's global
bucket counts, so every host picks the same bucket at the same step), `to_iter_dataset` with read
threads, and optional multiprocessing prefetch (off by default).

Batches are dicts of numpy arrays: `latent` [b, h, w, C], `text` [b, L, D] (or `token_ids` [b, L]),
`text_mask` [b, L] bool, `text_len` [b] int32, `orig_size` [b, 2] int32 (w, h) and `source` [b] str
(drop `source` before sending a batch to devices). L is the smallest caption-length bucket that
holds the longest caption of the batch; text is padded on the right with zeros (`pad_token_id`
for ids).

Bad data is counted and reported, never silently dropped and never a crash:
  - a record that fails to read or decode (or does not fit its bucket / the manifest's layout) is
    logged with its shard path and index and replaced by the next good record of the same bucket
    in storage order, so the replacement is deterministic and a resume reproduces it;
  - a caption longer than `max_caption_len` (the largest length bucket) is cut to that length,
    logged with its source key and counted;
  - the counters count what the consumer received (they are updated from the batches, so they are
    exact with prefetching and multiprocessing) and are part of the iterator state;
  - an unreadable or missing shard, a shard whose record count disagrees with the manifest, or
    fingerprints that differ from the expected ones fail at build time with the file named; so
    does a dataset without records (an `InputError`: one line, not Grain's error on no buckets).

`make_pipeline` returns a `PipelineIterator` (a Grain DatasetIterator, so Grain's Orbax
CheckpointHandler can save it) whose `get_state()` is JSON-serializable and whose `set_state()`
resumes at the exact next batch. The position in the state is one global number (global batches
consumed); only the bad-data counters are per process. `combine_states` turns the states saved by
P processes into the state of one process of a run with Q processes, so a run resumes on another
host count.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import logging
import os
import threading
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import ml_dtypes
import numpy as np
from grain.multiprocessing import SharedMemoryArray
from grain.sources import ArrayRecordDataSource

from svg_jax import malloc_tuning
from svg_jax.data import length_buckets as length_buckets_lib
from svg_jax.data import grain_reading
from svg_jax.data.global_position import agreed_position, process_of
from svg_jax.data import records
from svg_jax.input_errors import InputError

log = logging.getLogger(__name__)

# /2: the record order changed (_EpochShuffle), so a /1 state would not resume at its next batch.
# /3: global batches independent of the process count, and a new permutation every epoch.
STATE_FORMAT = "svg_jax.data.pipeline/3"
_OUT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def default_caption_buckets(max_caption_len: int, step: int = 32) -> tuple[int, ...]:
  """Multiples of `step` up to `max_caption_len`, which is always the last bucket."""
  if max_caption_len < 1 or step < 1:
    raise ValueError(f"need max_caption_len >= 1 and step >= 1, got {max_caption_len}, {step}")
  out = list(range(step, max_caption_len, step))
  return tuple(out + [max_caption_len])


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Input-pipeline settings (one ml_collections sub-config maps onto this with `from_mapping`).

  per_process_batch_size: examples per batch on this process (global batch / process count; the
    global batch is this times the process count).
  max_caption_len: longest caption kept (tokens); longer ones are cut and reported.
  caption_len_buckets: increasing pad lengths; the last must equal max_caption_len. Empty means:
    fitted to the dataset's caption-length histogram (manifest `text_len_histogram`) when
    `num_caption_buckets` > 0 (see svg_jax/data/length_buckets.py; bench/padding.py measures the
    padding this saves), else multiples of 32 up to max_caption_len.
  num_caption_buckets: how many buckets to fit when caption_len_buckets is empty (0: don't fit).
  seed: shuffle seed; must be the same on every host.
  bucket_weights: mixing weight per bucket key ("<h>x<w>"); None means the manifest record counts.
  buckets: bucket keys to use; empty means all buckets of the manifest.
  latent_dtype, text_dtype: "float32" or "bfloat16" for the batch arrays.
  pad_token_id: pad value of `token_ids` datasets.
  num_threads, prefetch_buffer_size: Grain read threads and buffered batches per process.
  num_workers: Grain worker processes (0 = no multiprocessing).
  reuse_freed_memory: keep freed loader buffers in the process instead of faulting them in again
    (glibc malloc settings for the whole process, svg_jax/malloc_tuning.py; only where JAX's
    backend is the CPU, unless SVG_JAX_DEFAULT_MALLOC=0).
  max_reports: how many bad-record / truncated-caption entries the state keeps (counts are exact).
  """
  per_process_batch_size: int
  max_caption_len: int = 256
  caption_len_buckets: tuple[int, ...] = ()
  num_caption_buckets: int = 0
  seed: int = 0
  bucket_weights: Mapping[str, float] | None = None
  buckets: tuple[str, ...] = ()
  latent_dtype: str = "float32"
  text_dtype: str = "float32"
  pad_token_id: int = 0
  num_threads: int = 4
  prefetch_buffer_size: int = 8
  num_workers: int = 0
  reuse_freed_memory: bool = True
  max_reports: int = 100

  @classmethod
  def from_mapping(cls, cfg: Mapping[str, Any]) -> PipelineConfig:
    """Builds a config from a dict or ConfigDict; unknown keys are an error."""
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - names)
    if unknown:
      raise ValueError(f"unknown pipeline config keys {unknown}; known: {sorted(names)}")
    for key in ("caption_len_buckets", "buckets"):
      if key in cfg and cfg[key] is not None:
        cfg[key] = tuple(cfg[key])
    return cls(**cfg)

  def length_buckets(self, text_len_histogram: Mapping[str, int] | None = None) -> tuple[int, ...]:
    b = tuple(int(v) for v in self.caption_len_buckets)
    if not b and self.num_caption_buckets > 0 and text_len_histogram:
      lengths = np.repeat([int(k) for k in text_len_histogram],
                          [int(v) for v in text_len_histogram.values()])
      b = length_buckets_lib.optimal_length_buckets(
          lengths, self.num_caption_buckets, multiple=8, max_len=self.max_caption_len)
      b = b[:-1] + (self.max_caption_len,)
    b = b or default_caption_buckets(self.max_caption_len)
    if any(v < 1 for v in b) or list(b) != sorted(set(b)):
      raise ValueError(f"caption_len_buckets must be positive and strictly increasing, got {b}")
    if b[-1] != self.max_caption_len:
      raise ValueError(f"the largest caption_len_bucket {b[-1]} must equal max_caption_len "
                       f"{self.max_caption_len} (captions are cut to max_caption_len)")
    return b

  def validate(self) -> None:
    if self.per_process_batch_size < 1:
      raise ValueError(f"per_process_batch_size must be >= 1, got {self.per_process_batch_size}")
    self.length_buckets()
    for name in ("latent_dtype", "text_dtype"):
      if getattr(self, name) not in _OUT_DTYPES:
        raise ValueError(
            f"{name} must be one of {sorted(_OUT_DTYPES)}, got {getattr(self, name)!r}")
    if self.num_threads < 0 or self.prefetch_buffer_size < 0 or self.num_workers < 0:
      raise ValueError("num_threads, prefetch_buffer_size (data.prefetch) and num_workers must be "
                       f">= 0, got {self.num_threads}, {self.prefetch_buffer_size} and "
                       f"{self.num_workers}")


def _bucket_seed(seed: int, key: str) -> int:
  """A per-bucket shuffle seed in [0, 2^32) from (seed, bucket key) only: equal on all hosts."""
  return int(np.random.SeedSequence([seed, zlib.crc32(key.encode())]).generate_state(1)[0])


class _EpochShuffle:
  """Maps a position in the repeated stream to a record index: a new permutation every epoch.

  Stands in for Grain's `shuffle`, whose per-index cipher cost ~16% of the loader's CPU (perf,
  bench/loader.py). A permutation is a pure function of (seed, epoch), so every host and every
  resume agree. It costs 4 bytes per record and the three latest epochs are kept (Grain's read
  threads can straddle an epoch boundary). Drawing one takes seconds for 1e8 records (6 s here),
  so the next epoch's is drawn in the background once this one is half read. Picklable, for Grain
  worker processes.
  """

  _KEEP = 3

  def __init__(self, num_records: int, seed: int):
    self.num_records, self.seed = int(num_records), int(seed)
    self._perms: dict[int, np.ndarray] = {}
    self._drawing: dict[int, threading.Event] = {}  # epochs being drawn, set once stored
    self._started: set[int] = set()
    self._lock = threading.Lock()

  def _draw(self, epoch: int) -> np.ndarray:
    perm = np.arange(self.num_records, dtype=np.uint32 if self.num_records < 2**32 else np.int64)
    np.random.default_rng([self.seed, epoch]).shuffle(perm)
    return perm

  def permutation(self, epoch: int) -> np.ndarray:
    """The epoch's permutation, drawn once: a caller that finds it being drawn (the background
    thread, or another read thread) waits for that draw instead of repeating it."""
    with self._lock:
      perm = self._perms.get(epoch)
      pending = None if perm is not None else self._drawing.get(epoch)
      if perm is None and pending is None:
        self._drawing[epoch] = threading.Event()
    if perm is not None:
      return perm
    if pending is not None:
      pending.wait()
      with self._lock:
        perm = self._perms.get(epoch)
      # Evicted already (three newer epochs drawn meanwhile): drawing again gives the same order.
      return perm if perm is not None else self._draw(epoch)
    try:
      perm = self._draw(epoch)  # outside the lock: reads of the epochs already drawn go on
      with self._lock:
        self._perms[epoch] = perm
        for old in sorted(self._perms)[:-self._KEEP]:
          del self._perms[old]
    finally:
      with self._lock:
        self._drawing.pop(epoch).set()
    return perm

  def __call__(self, position: int) -> int:
    epoch, i = divmod(int(position), self.num_records)
    if i >= self.num_records // 2 and epoch + 1 not in self._started:
      with self._lock:
        start = epoch + 1 not in self._started
        self._started.add(epoch + 1)
      if start:
        threading.Thread(target=self.permutation, args=(epoch + 1,), daemon=True).start()
    return int(self.permutation(epoch)[i])

  def __getstate__(self) -> dict:
    return {"num_records": self.num_records, "seed": self.seed}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state["num_records"], state["seed"])


class _GlobalRows:
  """Maps this process's i-th example of a bucket to its position in the bucket's stream: row
  `rows[i % b]` of global batch `i // b` (b = len(rows)), i.e. `(i // b) * global_batch + row`.
  Picklable, for Grain worker processes."""

  def __init__(self, global_batch: int, rows: Sequence[int]):
    self.global_batch, self.rows = int(global_batch), tuple(int(r) for r in rows)

  def __call__(self, i: int) -> int:
    batch, j = divmod(int(i), len(self.rows))
    return batch * self.global_batch + self.rows[j]


class _BucketReader:
  """Maps a bucket-local record index to a decoded, caption-truncated example.

  A record that fails is replaced by the next good one in storage order (wrapping around); the
  failures travel with the example in `_bad` so the consumer can count and report them.
  Picklable (Grain worker processes get a copy).
  """

  def __init__(self, key: str, shards: Sequence[tuple[str, int]], text_kind: str,
               text_dim: int | None, channels: int, max_caption_len: int,
               reuse_freed_memory: bool):
    self.key = key
    self.reuse_freed_memory = reuse_freed_memory
    self.bucket = records.parse_bucket_key(key)
    self.shards = [(p, n) for p, n in shards]
    self.starts = np.cumsum([0] + [n for _, n in self.shards])
    self.num_records = int(self.starts[-1])
    self.text_kind, self.text_dim, self.channels = text_kind, text_dim, channels
    self.max_caption_len = max_caption_len
    # "path[0:n]" read instructions: the source opens each file lazily, once per process.
    self.source = ArrayRecordDataSource([f"{p}[0:{n}]" for p, n in self.shards])

  def location(self, index: int) -> str:
    s = int(np.searchsorted(self.starts, index, side="right") - 1)
    return f"{self.shards[s][0]}#{index - int(self.starts[s])}"

  def _check_layout(self, rec: dict) -> None:
    if rec["bucket"] != self.bucket:
      raise records.BadRecordError(f"bucket {rec['bucket']} in a shard of bucket {self.bucket}")
    if rec["latent"].shape[-1] != self.channels:
      raise records.BadRecordError(
          f"latent has {rec['latent'].shape[-1]} channels, the manifest says {self.channels}")
    if self.text_kind not in rec:
      raise records.BadRecordError(f"record has no {self.text_kind} (the manifest's text kind)")
    if self.text_kind == "text_features" and rec["text_features"].shape[-1] != self.text_dim:
      raise records.BadRecordError(f"text_features dim {rec['text_features'].shape[-1]}, the "
                                   f"manifest says {self.text_dim}")

  def __call__(self, index: int) -> dict:
    if self.reuse_freed_memory:
      malloc_tuning.tune()  # once per process: Grain workers are processes of their own
    index = int(index)
    bad = []
    for k in range(self.num_records):
      j = (index + k) % self.num_records
      try:
        # The shard reader has checked the record's chunk hash (a corrupt chunk raises here).
        rec = records.decode_record(self.source[j], verify_crc=False)
        self._check_layout(rec)
      except Exception as e:  # any read or decode failure makes this one record bad
        bad.append(f"{self.location(j)}: {type(e).__name__}: {e}")
        continue
      break
    else:
      raise records.BadRecordError(
          f"bucket {self.key}: all {self.num_records} records are unreadable; first: {bad[0]}")
    text_len = rec["text_len"]
    truncated = []
    if text_len > self.max_caption_len:
      truncated.append(f"{rec['source']} ({text_len} -> {self.max_caption_len} tokens)")
      text_len = self.max_caption_len
    return {
        "latent": rec["latent"],
        "text": rec[self.text_kind][:text_len],
        "text_len": text_len,
        "orig_size": rec["orig_size"],
        "source": rec["source"],
        "_bad": bad,
        "_truncated": truncated,
    }


def _bits(a: np.ndarray) -> np.ndarray:
  """bf16 arrays as uint16 views: numpy copies and fills ml_dtypes' bf16 element by element, 2-10x
  slower than the same bits as uint16 (zero is all-zero bits in both)."""
  return a.view(np.uint16) if a.dtype == _OUT_DTYPES["bfloat16"] else a


class _Collate:
  """Stacks examples of one bucket and pads their captions to the batch's length bucket."""

  def __init__(self, length_buckets: Sequence[int], text_kind: str, latent_dtype: str,
               text_dtype: str, pad_token_id: int):
    self.length_buckets = np.asarray(length_buckets)
    self.text_kind = text_kind
    self.latent_dtype = _OUT_DTYPES[latent_dtype]
    self.text_dtype = _OUT_DTYPES[text_dtype]
    self.pad_token_id = pad_token_id

  def __call__(self, examples: Sequence[dict]) -> dict:
    lens = np.array([e["text_len"] for e in examples], np.int32)
    pad_len = int(self.length_buckets[np.searchsorted(self.length_buckets, lens.max())])
    b = len(examples)
    if self.text_kind == "text_features":
      text = np.empty((b, pad_len, examples[0]["text"].shape[-1]), self.text_dtype)
      text_key, pad = "text", 0
    else:
      text = np.empty((b, pad_len), np.int32)
      text_key, pad = "token_ids", self.pad_token_id
    bits = _bits(text)
    for i, e in enumerate(examples):  # only the padding is filled, not the whole array first
      src = e["text"]
      bits[i, :lens[i]] = _bits(src) if src.dtype == text.dtype else src
      bits[i, lens[i]:] = pad
    return {
        "latent": np.stack([e["latent"] for e in examples]).astype(self.latent_dtype, copy=False),
        text_key: text,
        "text_mask": np.arange(pad_len)[None, :] < lens[:, None],
        "text_len": lens,
        "orig_size": np.array([e["orig_size"] for e in examples], np.int32),
        "source": np.array([e["source"] for e in examples]),
        "_bad": [x for e in examples for x in e["_bad"]],
        "_truncated": [x for e in examples for x in e["_truncated"]],
    }


@dataclasses.dataclass(frozen=True)
class PipelineInfo:
  """What a built pipeline reads: used buckets, their weights, and the state signature."""
  buckets: tuple[str, ...]
  weights: tuple[float, ...]
  text_kind: str
  manifest: dict
  signature: dict


def _resolve_rows(rows: Sequence[int] | None, per_process: int, process_index: int,
                  global_batch: int) -> tuple[int, ...]:
  if rows is None:
    return tuple(range(process_index * per_process, (process_index + 1) * per_process))
  rows = tuple(int(r) for r in rows)
  if len(rows) != per_process or any(not 0 <= r < global_batch for r in rows):
    raise ValueError(f"rows {rows} must be {per_process} rows of the global batch of "
                     f"{global_batch}")
  return rows


def release_shared_memory() -> None:
  """Waits until Grain has unlinked the shared memory of the batches this process let go.

  Batches from worker processes (`num_workers` > 0) arrive in shared memory, which Grain's
  deletion hands to a background thread. A process that exits right after its last batch leaves
  that thread's queue unfinished, and multiprocessing's resource tracker unlinks the rest with a
  "leaked shared_memory objects" warning."""
  deleter = getattr(SharedMemoryArray, "_del_thread_pool", None)  # one thread, first in first out
  if deleter is None:  # no worker has run in this process: no shared memory to release
    return
  gc.collect()  # batches caught in reference cycles (a traceback's frames) go now
  deleter.apply(int)  # a no-op queued behind every earlier unlink


def build_dataset(data_dir: str | os.PathLike, config: PipelineConfig | Mapping[str, Any], *,
                  process_index: int | None = None, process_count: int | None = None,
                  expected_fingerprints: Mapping[str, str] | None = None,
                  rows: Sequence[int] | None = None
                  ) -> tuple[grain.IterDataset, PipelineInfo]:
  """Builds the Grain IterDataset (batches still carry `_bad` / `_truncated`) and its info.

  rows: the rows of every global batch this process reads, in the order its local batch holds
  them (`parallel.process_batch_rows` of the mesh); default the contiguous block of the process.

  Fails here, naming the file, on a missing manifest, fingerprint mismatch, or a missing,
  unreadable or mis-counted shard of a used bucket.
  """
  if not isinstance(config, PipelineConfig):
    config = PipelineConfig.from_mapping(config)
  config.validate()
  process_index, process_count = process_of(process_index, process_count)
  global_batch = config.per_process_batch_size * process_count
  rows = _resolve_rows(rows, config.per_process_batch_size, process_index, global_batch)
  data_dir = os.fspath(data_dir)
  manifest = records.read_manifest(data_dir)
  if expected_fingerprints:
    records.check_fingerprints(manifest, expected_fingerprints)

  counts = manifest["buckets"]
  if not sum(counts.values()):
    raise InputError(f"the dataset {data_dir} has no records (its {records.MANIFEST_NAME} "
                     "lists 0)")
  keys = tuple(config.buckets) or tuple(k for k in sorted(counts) if counts[k] > 0)
  unknown = [k for k in keys if counts.get(k, 0) == 0]
  if unknown:
    raise InputError(f"buckets {unknown} have no records in {data_dir} (it has {counts})")
  if config.bucket_weights is None:
    weights = tuple(float(counts[k]) for k in keys)
  else:
    missing = [k for k in keys if k not in config.bucket_weights]
    extra = sorted(set(config.bucket_weights) - set(keys))
    if missing or extra:
      raise ValueError(f"bucket_weights: missing {missing}, not used/unknown {extra}")
    weights = tuple(float(config.bucket_weights[k]) for k in keys)
    if any(w <= 0 for w in weights):
      raise ValueError(f"bucket_weights must be positive, got {dict(zip(keys, weights))}")

  text_kind, text_dim = manifest["text"]["kind"], manifest["text"].get("dim")
  length_buckets = config.length_buckets(manifest.get("text_len_histogram"))
  collate = _Collate(length_buckets, text_kind, config.latent_dtype, config.text_dtype,
                     config.pad_token_id)
  per_bucket = []
  for key in keys:
    shards = []
    for s in manifest["shards"]:
      if s["bucket"] != key:
        continue
      path = os.path.join(data_dir, s["name"])
      records.open_shard(path, expected_records=s["num_records"]).close()
      shards.append((path, s["num_records"]))
    reader = _BucketReader(key, shards, text_kind, text_dim, manifest["latent_channels"],
                           config.max_caption_len, config.reuse_freed_memory)
    ds = (grain.MapDataset.range(0, 2**62)  # endless: this process's examples of the bucket
          .map(_GlobalRows(global_batch, rows))
          .map(_EpochShuffle(reader.num_records, _bucket_seed(config.seed, key)))
          .map(reader)
          .batch(config.per_process_batch_size, drop_remainder=True, batch_fn=collate))
    per_bucket.append(ds)
  mixed = per_bucket[0] if len(per_bucket) == 1 else grain.MapDataset.mix(per_bucket, weights)
  it_ds = grain_reading.read(mixed, num_threads=config.num_threads,
                             prefetch_buffer_size=config.prefetch_buffer_size,
                             num_workers=config.num_workers)

  manifest_hash = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
  signature = {
      "manifest_sha256": manifest_hash,
      "buckets": list(keys),
      "weights": list(weights),
      "global_batch_size": global_batch,
      "caption_len_buckets": list(length_buckets),
      "seed": config.seed,
      "num_workers": config.num_workers,
  }
  info = PipelineInfo(keys, weights, text_kind, manifest, signature)
  return it_ds, info


def _empty_stats() -> dict:
  return {"batches": 0, "examples": 0, "bad_records": 0, "truncated_captions": 0,
          "bad_record_reports": [], "truncated_caption_reports": []}


class PipelineIterator(grain.DatasetIterator):
  """Yields clean batch dicts, keeps the bad-data counters, and checkpoints both.

  `stats` holds exact counts over the batches returned so far (including those before a resume)
  and the first `max_reports` report lines of each kind.
  """

  def __init__(self, inner: grain.DatasetIterator, info: PipelineInfo, max_reports: int):
    super().__init__(inner)
    self.info = info
    self._max_reports = max_reports
    self._stats = _empty_stats()

  @property
  def stats(self) -> dict:
    return copy.deepcopy(self._stats)

  def close(self) -> None:
    """Stops the reader threads / worker processes (grain's own `close` since 0.2.15; older grain,
    the newest on Python 3.10, has it on the iterators only)."""
    base = getattr(super(), "close", None)
    if base is not None:
      base()
      return
    for parent in getattr(self, "_parents", ()):
      getattr(parent, "close", lambda: None)()

  def report(self) -> str:
    s = self._stats
    lines = [f"{s['batches']} batches, {s['examples']} examples; {s['bad_records']} bad records "
             f"replaced by the next good record; {s['truncated_captions']} captions cut"]
    lines += [f"  bad record {r}" for r in s["bad_record_reports"]]
    lines += [f"  caption cut {r}" for r in s["truncated_caption_reports"]]
    return "\n".join(lines)

  def __next__(self) -> dict:
    batch = next(self._parent)
    bad, truncated = batch.pop("_bad"), batch.pop("_truncated")
    s = self._stats
    s["batches"] += 1
    s["examples"] += len(batch["text_len"])
    for key, items, level in (("bad_record", bad, logging.ERROR),
                              ("truncated_caption", truncated, logging.WARNING)):
      for item in items:
        s[key + "s"] += 1
        if len(s[key + "_reports"]) < self._max_reports:
          s[key + "_reports"].append(item)
          log.log(level, "%s: %s", key.replace("_", " "), item)
    return batch

  def get_state(self) -> dict:
    return {"format": STATE_FORMAT, "signature": self.info.signature,
            "grain": self._parent.get_state(), "stats": self.stats}

  def set_state(self, state: dict) -> None:
    _check_state(state, self.info.signature)
    self._parent.set_state(state["grain"])
    self._stats = copy.deepcopy(state["stats"])

  def set_state_of_processes(self, states: Sequence[dict], process_index: int) -> None:
    """Resumes from the states that P processes saved, as process `process_index` of this run
    (any process count): see `combine_states`."""
    self.set_state(combine_states(states, process_index, self._max_reports))


class StateMismatchError(ValueError):
  """A saved loader state that this pipeline cannot resume from (other format or settings)."""


def _check_state(state, signature: dict) -> None:
  if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
    raise StateMismatchError(
        f"not a pipeline state of format {STATE_FORMAT!r} (got "
        f"{state.get('format') if isinstance(state, dict) else state!r}); states of other "
        "formats order the records differently and cannot resume here")
  theirs, ours = state["signature"], signature
  diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
  if diff:
    raise StateMismatchError(
        "the saved pipeline state belongs to a different pipeline; differing: "
        + ", ".join(f"{k} (saved {theirs.get(k)!r}, now {ours.get(k)!r})" for k in diff))


def combine_states(states: Sequence[dict], process_index: int, max_reports: int = 100) -> dict:
  """The state of process `process_index` of a run resuming from the states its P processes
  saved (`states[p]` of process p), whatever its own process count: the position is global and
  the same in every saved state; the counters are per process, so process 0 takes their sums
  (and the first report lines) and the others start at zero, which keeps the totals exact."""
  if not states:
    raise ValueError("no saved loader state")
  for s in states:
    if not isinstance(s, dict) or s.get("format") != STATE_FORMAT:
      _check_state(s, {})  # raises the format line
  agreed_position([s["grain"] for s in states], "loader")
  if process_index != 0:
    return {**states[0], "stats": {**_empty_stats(), "batches": states[0]["stats"]["batches"]}}
  stats = _empty_stats()
  for s in states:
    for key in ("batches", "examples", "bad_records", "truncated_captions"):
      stats[key] += s["stats"][key]
    for key in ("bad_record_reports", "truncated_caption_reports"):
      stats[key] = (stats[key] + s["stats"][key])[:max_reports]
  # `batches` counts global batches (each process received one part of each): not summed.
  stats["batches"] = states[0]["stats"]["batches"]
  return {**states[0], "stats": stats}


def make_pipeline(data_dir: str | os.PathLike, config: PipelineConfig | Mapping[str, Any], *,
                  process_index: int | None = None, process_count: int | None = None,
                  expected_fingerprints: Mapping[str, str] | None = None,
                  rows: Sequence[int] | None = None) -> PipelineIterator:
  """The training iterator over a precomputed dataset directory (see the module docstring).

  process_index / process_count default to jax.process_index() / jax.process_count(); rows: see
  `build_dataset`.
  """
  if not isinstance(config, PipelineConfig):
    config = PipelineConfig.from_mapping(config)
  ds, info = build_dataset(data_dir, config, process_index=process_index,
                           process_count=process_count,
                           expected_fingerprints=expected_fingerprints, rows=rows)
  return PipelineIterator(iter(ds), info, config.max_reports)
