"""Feature precomputation: images + captions -> normalized DINOv3 latents + Gemma-2 features, as
ArrayRecord shards and a manifest the training pipeline reads (`launch/precompute.py` is the CLI).

Inputs come from `data/sources.py` (jsonl / image folder / tfds).

Work per item: `sources.load_item` (caption check, decode, conversion, bucket + center crop); items are grouped by bucket and encoded `batch_size` at a time by the
jitted SVGAutoencoder (batch sharded over this process's devices) and the jitted Gemma-2
(`text.TextEncoder`). The caption gets its system prompt by the official training rule
(`text.training_caption`) unless `system_prompt` names one. Records hold bf16 latents and either
bf16 text features cut to their valid length or the token ids.

Bad inputs (missing / zero-byte / corrupt / truncated image, image smaller than `min_side`, image
mode that cannot be converted, empty or non-string caption, missing `.txt`, bad jsonl line) are
reported as {"key", "reason"} in the manifest's `bad_inputs` and on the console; the job goes on.
So are, as backstops behind those checks, any other exception of an image's load ("<Type>:
<message>": third-party decoders raise their own types), a record that cannot be stored and a
caption the tokenizer refuses (the rest of their batch is written). A job none of whose inputs
gives a record ends with an `InputError` once its manifest is written. Captions longer than
`max_length` tokens are cut (the official truncation) and counted (`truncated_captions`).

Resumability and processes. The ordered input list is cut into chunks of `records_per_shard`
consecutive inputs; chunk c belongs to process c % process_count. A chunk is written through a
`records.DatasetWriter` into a scratch folder (at most one shard per bucket, since a chunk holds at
most records_per_shard inputs), its shards are renamed into the output as
`c<chunk>-p<process>-<bucket>-<n>.array_record`, and then `progress/chunk-<c>.json` (its shards,
bad inputs, conversions, text lengths) is written atomically: that file is what marks a chunk done.
A rerun skips done chunks and redoes any other one from scratch (its stale shards removed);
`progress/plan.json` pins the input list, chunking and models, so a rerun with anything else
changed is refused instead of mixing two datasets. A run holds `progress/process-<index>.lock`
(`utils/folder_locks.py`), so a second run of its process index there is refused instead of
removing its scratch as stale. A write the file system refuses (a full disk) is `WriteFailed`,
Ctrl-C `Interrupted`: the unfinished chunk's scratch is removed either way, and a rerun resumes.
The process that finds every chunk done writes `empty_text.npy` and `manifest.json` (schema of
records.py, plus `text_len_histogram`, `conversions`, `truncated_captions`, `empty_text`,
`precompute`); all of them produce the same bytes.

`empty_text.npy` holds the features of the unconditional caption "" (<bos> alone, 1 token),
[1, D] float32 of bf16-rounded values like the records: what `train.dit_task.load_empty_text`
reads for caption dropout (`data.empty_text = "auto"`). In token-id mode it holds the ids [1] int32.
"""
from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import shutil
import sys
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from svg_jax import autoencoder
from svg_jax import config as config_lib
from svg_jax import parallel
from svg_jax import text as text_lib
from svg_jax.data import buckets, global_position, records
from svg_jax.data import sources
from svg_jax.data.sources import BadInput, Inputs, Loaded
from svg_jax.input_errors import InputError
from svg_jax.utils import (atomic_files, ctrl_c, error_lines, folder_locks,
                           writable_folders)
from svg_jax.utils.progress import Progress

PROGRESS_DIR = "progress"
PLAN_FILE = "plan.json"
EMPTY_TEXT_FILE = "empty_text.npy"  # the name the DiT task's empty-prompt loader looks for
TEXT_MODES = ("features", "token_ids")
MAX_CONVERSION_EXAMPLES = 20  # keys listed per conversion kind (and of truncated captions)
# Counted with the conversions: images whose EXIF asks for a rotation or flip that is not applied
# (the official loader's choice), taken as stored: a phone's portrait photo goes in sideways.
EXIF_NOT_APPLIED = "exif_orientation_not_applied"


class WriteFailed(writable_folders.FolderNotWritable):
  """The file system refused a write into the output folder (a full disk): one line, the
  operating system's reason first, exit 2. Finished chunks stay; a rerun resumes."""
  kind = "write error"


class Interrupted(Exception):
  """Ctrl-C (SIGINT) stopped the job; its message is the one line launch/precompute.py prints
  before it exits with cli.EXIT_INTERRUPTED."""


def validate_config(c: ml_collections.ConfigDict, patch_size: int | None = None) -> None:
  """One InputError listing every problem of a `precompute` section; with the encoder's
  `patch_size`, also whether resolution and max_ratio leave any bucket."""
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
  if float(c.max_ratio) < 1:
    problems.append(f"max_ratio must be >= 1, got {c.max_ratio}")
  elif patch_size and int(c.resolution) >= 1 and not buckets.buckets_for_resolution(
      int(c.resolution), int(patch_size), float(c.max_ratio)):
    problems.append(f"resolution {c.resolution} leaves no aspect-ratio bucket ({patch_size}-"
                    f"pixel patches, max_ratio {c.max_ratio}; with 16-pixel patches 256, 512 and "
                    "1024 leave 15, 27 and 51)")
  if c.output_dtype != "bfloat16":
    problems.append(f"output_dtype {c.output_dtype!r}: record schema v{records.SCHEMA_VERSION} "
                    "stores floats as bfloat16 only")
  if (c.process_index < 0) != (c.process_count < 0):
    problems.append("set both process_index and process_count, or neither (-1)")
  elif c.process_count >= 0 and not 0 <= c.process_index < c.process_count:
    problems.append(f"process_index {c.process_index} not in [0, {c.process_count})")
  if problems:
    raise InputError("precompute config: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------
# Text


def text_pad_length(longest: int, max_length: int) -> int:
  """Static padded lengths 8, 16, 32, ... (capped at max_length): few compiles of the encoder."""
  n = text_lib.PAD_MULTIPLE
  while n < longest:
    n *= 2
  return min(n, max_length)


# The files a tokenizer folder may hold (`save_pretrained`'s, of any tokenizer kind): what the
# tokenizer fingerprint hashes, so a folder holding other files too names the same tokenizer.
TOKENIZER_FILES = ("added_tokens.json", "chat_template.jinja", "chat_template.json", "merges.txt",
                   "special_tokens_map.json", "spiece.model", "tokenizer.json", "tokenizer.model",
                   "tokenizer_config.json", "vocab.json", "vocab.txt")


def tokenizer_fingerprint(tok_dir: str) -> str:
  """The `tokenizer=` field of `text_fingerprint`: a content hash of the tokenizer files of the
  folder (`TOKENIZER_FILES`; the whole folder when it holds none of them). The same tokenizer
  files give the same fingerprint in a Gemma-2 folder beside its weights, in a folder of their
  own, or beside notes."""
  some = any(os.path.isfile(os.path.join(tok_dir, n)) for n in TOKENIZER_FILES)
  return autoencoder.path_fingerprint(tok_dir, only=TOKENIZER_FILES if some else None)


def earlier_tokenizer_fingerprint(tok_dir: str) -> str:
  """The `tokenizer=` field earlier versions wrote: a hash of every file of the folder (weights
  included, when the tokenizer sits beside a model). Records and resume plans of theirs carry it."""
  return autoencoder.path_fingerprint(tok_dir)


def fingerprint_fields(fingerprint: str) -> dict[str, str]:
  """A `text_fingerprint` string as {field: value} ({} for strings of another form)."""
  fields = {}
  for part in fingerprint.split(";"):
    name, sep, value = part.partition("=")
    if sep:
      fields[name] = value
  return fields


def text_fingerprint(cfg: ml_collections.ConfigDict) -> str:
  """The manifest's `text_encoder` fingerprint: files, layer, max length, prompt rule, mode."""
  tok_dir = cfg.tokenizer_dir or cfg.text_encoder_dir
  parts = [f"tokenizer={tokenizer_fingerprint(tok_dir)}"]
  if cfg.text_mode == "features":
    parts.insert(0, f"model={autoencoder.path_fingerprint(cfg.text_encoder_dir)}")
    parts.append(f"layer={cfg.hidden_layer}")
  parts += [f"max_length={cfg.max_length}", f"system_prompt={cfg.system_prompt}",
            f"mode={cfg.text_mode}"]
  return ";".join(parts)


def expected_fingerprints(config: ml_collections.ConfigDict) -> dict[str, str]:
  """The fingerprints a dataset precomputed with `config` carries, computed from the files alone
  (no model is loaded): what a trainer passes to `pipeline.make_pipeline(expected_fingerprints=)`
  to refuse data made with other weights, statistics or text settings."""
  return {**autoencoder.config_fingerprints(config.autoencoder),
          "text_encoder": text_fingerprint(job_config(config))}


def job_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `precompute` section of a config, or its defaults when it has none."""
  return config.precompute if "precompute" in config else config_lib.precompute_defaults()


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

  def was_truncated(self, text: str) -> bool:
    """Whether `text` (system prompt in front) is longer than max_length tokens, so that `encode`
    cut it (the official training truncation)."""
    return len(self.tokenizer(text)["input_ids"]) > self.cfg.max_length

  def refusals(self, texts: Sequence[str]) -> list[str | None]:
    """Per text, None or why the tokenizer refuses it alone (its one-line error)."""
    reasons = []
    for text in texts:
      try:
        self.tokenizer(text)
        reasons.append(None)
      except Exception as e:  # noqa: BLE001  (the tokenizer's types are its own)
        reasons.append(f"caption cannot be tokenized ({error_lines.first_line(e)})")
    return reasons

  def empty_text(self) -> np.ndarray:
    """The unconditional caption "" (<bos> only): [1, D] float32 (bf16 values) or [1] int32."""
    arr = self.encode([text_lib.UNCONDITIONAL], 1)[0]
    return arr.astype(np.float32) if self.mode == "features" else arr.astype(np.int32)


# ----------------------------------------------------------------------------------------------
# The job


def check_output_folder(out: str, create: bool = False) -> None:
  """InputError (one line) for an output folder that cannot be made or written, or that holds a
  dataset this job did not write; `create` makes it. Called before the models load."""
  writable_folders.check_writable_folder(out, "output folder", create=create)
  if (os.path.exists(os.path.join(out, records.MANIFEST_NAME))
      and not os.path.exists(os.path.join(out, PROGRESS_DIR, PLAN_FILE))):
    raise InputError(f"{out} holds a dataset not written by this precompute "
                     f"(no {PROGRESS_DIR}/{PLAN_FILE}); use another output folder")


def _chunk_file(out: str, c: int) -> str:
  return os.path.join(out, PROGRESS_DIR, f"chunk-{c:06d}.json")


def _chunk_prefix(c: int) -> str:
  return f"c{c:06d}-"


class Precomputer:
  """Runs the job of one process (see the module docstring).

  ae: an `SVGAutoencoder` with its encoder (its `batch_size`, mesh and fingerprints are used).
  text_side: a `TextSide`. cfg: a `config_lib.precompute_defaults()` section.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, ae: Any, text_side: TextSide, *,
               process_index: int | None = None, process_count: int | None = None,
               stream=None):
    validate_config(cfg, ae.encoder_cfg.patch_size)
    self.cfg, self.ae, self.text = cfg, ae, text_side
    if process_index is None:
      process_index = cfg.process_index if cfg.process_index >= 0 else None
      process_count = cfg.process_count if cfg.process_count >= 0 else None
    self.process_index, self.process_count = global_position.process_of(process_index,
                                                                         process_count)
    self.stream = stream or sys.stdout
    self.ctrl_c = ctrl_c.Remembered()  # a Ctrl-C whose KeyboardInterrupt was lost still stops
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
    old = atomic_files.read_json(path)
    if old == plan:
      return
    if old is not None:
      old = self._in_this_versions_fingerprints(old, plan)
      if old != plan:
        raise InputError(f"{out} holds a precompute run with a different plan (differs in "
                         f"{atomic_files.differing_keys(old, plan)}); use another output folder "
                         "or delete it")
      self._print(f"precompute: {path} was written by an earlier svg-jax version for the same "
                  "inputs and settings; it now holds this version's fingerprints")
    atomic_files.write_json(path, plan)

  def _in_this_versions_fingerprints(self, old: dict, plan: dict) -> dict:
    """`old` with the fingerprints that earlier versions wrote for the files `plan` names given
    as this version writes them: a TFDS input named by name/split/length (now with its recorded
    sizes and sampled contents), a tokenizer hashed with every file of its folder (now its
    tokenizer files)."""
    old = json.loads(json.dumps(old))
    if (str(old.get("inputs")).startswith("tfds:")
        and plan["inputs"].startswith(f"{old['inputs']}:sha256:")):
      old["inputs"] = plan["inputs"]
    recorded = (old.get("fingerprints") or {}).get("text_encoder", "")
    ours = plan["fingerprints"]["text_encoder"]
    fields, our_fields = fingerprint_fields(recorded), fingerprint_fields(ours)
    if (recorded != ours and {**fields, "tokenizer": None} == {**our_fields, "tokenizer": None}
        and fields.get("tokenizer") == earlier_tokenizer_fingerprint(
            self.cfg.tokenizer_dir or self.cfg.text_encoder_dir)):
      old["fingerprints"]["text_encoder"] = ours
    return old

  # -- one chunk

  @staticmethod
  def _report_bad(writer: records.DatasetWriter, stats: dict, key: str, reason: str) -> None:
    writer.report_bad(key, reason)
    stats["bad_inputs"].append({"key": key, "reason": reason})

  def _encode_texts(self, writer: records.DatasetWriter, group: list[Loaded], stats: dict
                    ) -> tuple[list[Loaded], list[str], list[np.ndarray]]:
    """The group's captions encoded: (items kept, their texts, their arrays). A caption the
    tokenizer refuses (the whole batch fails) is that input's bad input; a failure that no caption
    alone causes goes up."""
    texts = [g.item.system_prompt + g.item.caption for g in group]
    try:
      return group, texts, self.text.encode(texts, self.cfg.batch_size)
    except Exception:
      reasons = self.text.refusals(texts)
      if not any(reasons):
        raise
    kept = []
    for g, text, reason in zip(group, texts, reasons):
      if reason:
        self._report_bad(writer, stats, g.item.key, reason)
      else:
        kept.append((g, text))
    if not kept:
      return [], [], []
    group, texts = [g for g, _ in kept], [t for _, t in kept]
    return group, texts, self.text.encode(texts, self.cfg.batch_size)

  def _flush(self, writer: records.DatasetWriter, group: list[Loaded], stats: dict) -> int:
    """Encodes and writes a group of one bucket; returns how many records it wrote. An input
    whose record cannot be made (its caption or key cannot be stored) is a bad input of its own:
    the rest of the group is written."""
    group, texts, text_arrays = self._encode_texts(writer, group, stats)
    if not group:
      return 0
    latents = self.ae.encode(np.stack([g.crop for g in group]))
    text_name = "text_features" if self.text.mode == "features" else "token_ids"
    written = 0
    for g, text, z, t in zip(group, texts, latents, text_arrays):
      try:
        writer.add({"latent": z, "caption": g.item.caption, text_name: t,
                    "text_len": int(t.shape[0]), "bucket": g.bucket, "orig_size": g.orig_size,
                    "source": g.item.key})
      except records.BadRecordError as e:  # nothing of it was written
        self._report_bad(writer, stats, g.item.key, str(e))
        continue
      written += 1
      hist = stats["text_len_histogram"]
      hist[str(t.shape[0])] = hist.get(str(t.shape[0]), 0) + 1
      if t.shape[0] >= self.cfg.max_length and self.text.was_truncated(text):
        stats["truncated_captions"].append(g.item.key)
    return written

  def run_chunk(self, inputs: Inputs, c: int, out: str, progress: Progress) -> dict:
    """Processes chunk c from scratch and marks it done; returns its done-file content."""
    n = int(self.cfg.records_per_shard)
    indices = range(c * n, min(len(inputs), (c + 1) * n))
    for stale in glob.glob(os.path.join(out, _chunk_prefix(c) + "*")):
      os.remove(stale)
    for stale in glob.glob(os.path.join(out, PROGRESS_DIR, f"chunk-{c:06d}.tmp-*")):
      shutil.rmtree(stale, ignore_errors=True)  # scratch of a killed run
    scratch = os.path.join(out, PROGRESS_DIR, f"chunk-{c:06d}.tmp-{os.getpid()}")
    stats = {"text_len_histogram": {}, "conversions": [], "bad_inputs": [],
             "truncated_captions": []}
    pending: dict[tuple[int, int], list[Loaded]] = {}

    def load(i: int):
      item = inputs[i]
      try:
        return sources.load_item(item, self.cfg, self.patch_size)
      except BadInput as e:
        return item.key, e.reason
      except MemoryError:
        raise  # the host's, not the input's
      except Exception as e:  # noqa: BLE001  (third-party decoders raise any type)
        return item.key, error_lines.first_line(e)

    writer = None
    try:
      writer = records.DatasetWriter(scratch, fingerprints=self.fingerprints,
                                     records_per_shard=n, compression=self.cfg.shard_compression)
      # Decoded crops are held only for a window of inputs (memory stays bounded at 1024 px).
      window = max(4 * int(self.cfg.batch_size), 4 * int(self.cfg.num_threads))
      with concurrent.futures.ThreadPoolExecutor(self.cfg.num_threads) as pool:
        results = (r for s in range(0, len(indices), window)
                   for r in pool.map(load, indices[s:s + window]))
        for result in results:
          self.ctrl_c.check()
          if isinstance(result, tuple):
            self._report_bad(writer, stats, *result)
            progress.update(done=1)
            continue
          if result.conversion != "none":
            stats["conversions"].append({"key": result.item.key, "kind": result.conversion})
          if result.exif_orientation != 1:
            stats["conversions"].append({"key": result.item.key, "kind": EXIF_NOT_APPLIED})
          group = pending.setdefault(result.bucket, [])
          group.append(result)
          if len(group) >= self.cfg.batch_size:
            progress.update(done=len(group), good=self._flush(writer, group, stats))
            pending[result.bucket] = []
      for bucket in sorted(pending):
        if pending[bucket]:
          progress.update(done=len(pending[bucket]),
                          good=self._flush(writer, pending[bucket], stats))
      manifest = writer.close()
      shards = []
      for s in manifest["shards"]:
        name = f"{_chunk_prefix(c)}p{self.process_index:03d}-{s['name']}"
        os.replace(os.path.join(scratch, s["name"]), os.path.join(out, name))
        shards.append({"name": name, "bucket": s["bucket"], "num_records": s["num_records"]})
      done = {"chunk": c, "process_index": self.process_index, "num_inputs": len(indices),
              "shards": shards, **stats}
      atomic_files.write_json(_chunk_file(out, c), done)
      return done
    except BaseException:
      if writer is not None:
        writer.__exit__(*sys.exc_info())  # drops the open shards, whatever their close raises
      raise
    finally:
      shutil.rmtree(scratch, ignore_errors=True)  # a chunk not marked done is redone from scratch

  # -- the whole job

  def num_chunks(self, inputs: Inputs) -> int:
    return -(-len(inputs) // int(self.cfg.records_per_shard))

  def run(self, inputs: Inputs, out: str) -> dict | None:
    """Processes this process's unfinished chunks; writes the manifest when every chunk is done
    (returns it), else returns None (another process will). An output folder that cannot be
    written, another run of this process index on it (folder_locks.FolderBusy) or a write the
    file system refuses (WriteFailed) is an InputError; Ctrl-C raises Interrupted."""
    out = os.fspath(out)
    check_output_folder(out, create=True)
    progress_dir = os.path.join(out, PROGRESS_DIR)
    writable_folders.check_writable_folder(progress_dir, "the progress folder")
    # Held for the whole run: a second run of this process index would take this one's chunks
    # for a killed run's and remove its scratch folder.
    lock = os.path.join(progress_dir, f"process-{self.process_index:03d}.lock")
    with folder_locks.hold(lock, f"another precompute is writing {out} (process "
                                 f"{self.process_index})"), self.ctrl_c.installed():
      return self._run_locked(inputs, out)

  def _run_locked(self, inputs: Inputs, out: str) -> dict | None:
    mine = [c for c in range(self.num_chunks(inputs))
            if c % self.process_count == self.process_index]
    finished = 0
    try:
      self._check_plan(out, self._plan(inputs))
      todo = [c for c in mine if not self._chunk_done(out, c)]
      finished = len(mine) - len(todo)
      n = int(self.cfg.records_per_shard)
      total = sum(min(len(inputs), (c + 1) * n) - c * n for c in todo)
      self._print(f"precompute: {len(inputs)} inputs in {self.num_chunks(inputs)} chunks; process "
                  f"{self.process_index}/{self.process_count} has {len(mine)} chunks, "
                  f"{finished} already done, {total} inputs to do")
      progress = Progress(total, what="inputs", stream=sys.stderr)
      start = time.perf_counter()
      try:
        for c in todo:
          self.ctrl_c.check()
          self.run_chunk(inputs, c, out, progress)
          finished += 1
      finally:
        progress.end_line()
      elapsed = time.perf_counter() - start
      self.images_per_second = progress.good / elapsed if elapsed > 0 and progress.good else 0.0
      self._print(f"precompute: {progress.good} images encoded in {elapsed:.1f} s: "
                  f"{self.images_per_second:.2f} images/s ({progress.done - progress.good} bad)")
      if not all(self._chunk_done(out, c) for c in range(self.num_chunks(inputs))):
        self._print("precompute: other processes still have chunks to do; the last one to finish "
                    "writes manifest.json")
        return None
      manifest = self.finalize(inputs, out)
    except KeyboardInterrupt:
      # run_chunk has removed the unfinished chunk's scratch: what stays is what a rerun resumes.
      # Counted on disk: a Ctrl-C just after a chunk's file was written (while its scratch is
      # removed) left it uncounted.
      finished = sum(self._chunk_done(out, c) for c in mine)
      raise Interrupted(f"precompute: interrupted after {finished} of {len(mine)} chunks; rerun "
                        "the same command to resume") from None
    except OSError as e:
      if isinstance(e, InputError):
        raise
      reason = error_lines.first_line(e)
      if e.errno and e.strerror:  # the operating system's reason first, as the TensorStore's
        reason = f"{e.strerror} [errno {e.errno}]; {reason}"
      raise WriteFailed(f"{reason}; writing {out} stopped after {finished} of "
                        f"{len(mine)} chunks (finished chunks are kept); rerun to resume once "
                        "there is room") from None
    self._print(summary(manifest))
    if not manifest["num_records"]:
      raise InputError(f"none of the {len(inputs)} inputs gave a record (every one is a bad input, "
                       f"listed above and in {os.path.join(out, records.MANIFEST_NAME)})")
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
    shards, bad, conversions, hist, truncated = [], [], [], {}, []
    for c in range(self.num_chunks(inputs)):
      with open(_chunk_file(out, c)) as f:
        done = json.load(f)
      shards += done["shards"]
      bad += done["bad_inputs"]
      conversions += done["conversions"]
      truncated += done.get("truncated_captions", [])  # absent in chunks of older runs
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
    atomic_files.save_npy(os.path.join(out, EMPTY_TEXT_FILE), empty)
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
        "truncated_captions": {"count": len(truncated), "max_length": int(self.cfg.max_length),
                               "examples": truncated[:MAX_CONVERSION_EXAMPLES]},
        "empty_text": {"file": EMPTY_TEXT_FILE, "shape": list(empty.shape),
                       "dtype": str(empty.dtype), "caption": text_lib.UNCONDITIONAL},
        "precompute": {"resolution": int(c.resolution), "max_ratio": float(c.max_ratio),
                       "patch_size": int(self.patch_size), "max_length": int(c.max_length),
                       "system_prompt": c.system_prompt, "text_mode": c.text_mode,
                       "hidden_layer": int(c.hidden_layer), "min_side": int(c.min_side),
                       # token ids are < this: the trainer checks its encoder's vocab_size
                       "tokenizer_size": len(self.text.tokenizer),
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
    what = ("taken as stored, their EXIF orientation not applied (as the official loader)"
            if kind == EXIF_NOT_APPLIED else f"converted ({kind})")
    lines.append(f"  {what}: {entry['count']}, e.g. {', '.join(entry['examples'][:3])}")
  cut = manifest.get("truncated_captions")
  if cut is not None:
    lines.append(f"  captions cut to {cut['max_length']} tokens (system prompt and <bos> included, "
                 f"the official truncation): {cut['count']}" + (
                     f", e.g. {', '.join(cut['examples'][:3])}" if cut["count"] else ""))
  bad = manifest["bad_inputs"]
  lines.append(f"  bad inputs: {len(bad)}")
  lines += [f"  bad input {b['key']}: {b['reason']}" for b in bad[:max_lines]]
  if len(bad) > max_lines:
    lines.append(f"  ... and {len(bad) - max_lines} more (all in manifest.json)")
  # A backstop: the sources make such keys printable, but a reason may quote a name of other
  # bytes (surrogates), which a UTF-8 console refuses at the end of a long job.
  return "\n".join(lines).encode("utf-8", "backslashreplace").decode("utf-8")


def run_job(config: ml_collections.ConfigDict, input_path: str, input_format: str, out: str
            ) -> dict | None:
  """launch/precompute.py's job. The config, the output folder and the inputs are checked before
  the models load, so that a bad one is reported at once; then `Precomputer.run`."""
  try:
    cfg = job_config(config)
    validate_config(cfg, int(config.autoencoder.encoder.patch_size))
    check_output_folder(out)
    inputs = sources.list_inputs(input_path, input_format, cfg)
    precomputer = build(config)
  except KeyboardInterrupt:
    raise Interrupted("precompute: interrupted before the first chunk (nothing written); rerun "
                      "the same command to start") from None
  return precomputer.run(inputs, out)


def build(config: ml_collections.ConfigDict, *, stream=None) -> Precomputer:
  """Loads the encoder (batch sharded over this process's local devices) and the text side."""
  cfg = job_config(config)
  validate_config(cfg, int(config.autoencoder.encoder.patch_size))
  ae_cfg = ml_collections.ConfigDict(config.autoencoder.to_dict())
  ae_cfg.batch_size = int(cfg.batch_size)
  mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())
  ae = autoencoder.SVGAutoencoder.from_config(ae_cfg, decoder=False, mesh=mesh)
  return Precomputer(cfg, ae, TextSide(cfg), stream=stream)
