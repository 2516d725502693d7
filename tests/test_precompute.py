"""Feature precomputation: real images, bad inputs, resume, processes, tfds, the pipeline, the CLI.

References: the records are checked against `SVGAutoencoder.encode` of `autoencoder.preprocess`'s
crop (itself tested against transformers' DINOv3 in test_autoencoder) and `text.TextEncoder`
(tested against transformers' Gemma2Model in test_gemma2 / test_demo_text_encoder), loaded
independently from the same files: a tiny random DINOv3 saved as an official .pth through
svg_jax.convert, and the demo text encoder folder (HF safetensors + tokenizer). The real images
are the shared test assets; bad files are made with PIL / raw bytes here.
"""
import dataclasses
import hashlib
import io
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import pytest
from PIL import Image

import script_runs
import tfds_datasets
import test_dinov3
from svg_jax import autoencoder as ae_lib
from svg_jax import config as config_lib
from svg_jax import latent_stats as ls
from svg_jax import precompute as pc
from svg_jax import text as text_lib
from svg_jax.convert import dinov3 as enc_conv
from svg_jax.convert.torch_pickle import save_torch_file
from svg_jax.data import images, pipeline, records, sources
from svg_jax.demo import shapes
from svg_jax.demo import text_encoder as demo
from svg_jax.input_errors import InputError
from svg_jax.utils.progress import Progress

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENC = test_dinov3.SMALL  # dim 64, 3 blocks, 2 registers, patch 16
CAPTIONS = [shapes.item_spec(0, "train", i, 64)["prompt"] for i in range(120)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Tiny random DINOv3 (.pth, official keys), statistics, and the demo text encoder."""
  root = tmp_path_factory.mktemp("precompute_models")
  model = test_dinov3._random_hf(test_dinov3.SMALL_HF, seed=21)
  params = enc_conv.hf_to_params(test_dinov3._hf_state(model), ENC)
  enc_path = str(root / "dinov3_tiny.pth")
  save_torch_file(enc_path, enc_conv.params_to_official(params, ENC))
  stats_path = str(root / "stats.pt")
  rng = np.random.default_rng(3)
  ls.save_latent_stats(stats_path, rng.normal(0, 0.3, ENC.dim), rng.uniform(0.5, 1.5, ENC.dim))
  text_dir = demo.ensure_demo_text_encoder(str(root / "text"), CAPTIONS, seed=0)
  return {"encoder": enc_path, "stats": stats_path, "text": text_dir}


def _config(files, **overrides):
  c = config_lib.precompute_job_config()
  c.autoencoder.encoder.update(dataclasses.asdict(ENC))
  c.autoencoder.encoder_path, c.autoencoder.stats_path = files["encoder"], files["stats"]
  c.precompute.text_encoder_dir = files["text"]
  c.precompute.update(dict(resolution=64, min_side=16, batch_size=4, records_per_shard=64,
                           num_threads=2))
  c.precompute.update(overrides)
  return c


@pytest.fixture(scope="module")
def job_factory(files):
  """Builds Precomputers; the loaded encoders are shared between tests (loading is slow)."""
  cache = {}

  def make(**overrides):
    config = _config(files, **overrides)
    mode = config.precompute.text_mode
    if mode not in cache:
      cache[mode] = pc.build(config)
    base = cache[mode]
    text_side = base.text
    text_side.cfg = config.precompute  # same model; lengths / prompts from this config
    return pc.Precomputer(config.precompute, base.ae, text_side,
                          process_index=overrides.get("process_index", 0),
                          process_count=overrides.get("process_count", 1),
                          stream=sys.stdout)

  return make


@pytest.fixture(scope="module")
def references(files):
  """Independent single-device encoder and a float32 TextEncoder from the same files."""
  config = _config(files)
  ae = ae_lib.SVGAutoencoder.from_config(config.autoencoder, decoder=False)
  te = text_lib.TextEncoder.from_pretrained(files["text"], max_length=text_lib.TRAIN_MAX_LENGTH)
  return ae, te


def _read_all(out):
  recs = []
  for shard, rec in records.iter_records(out):
    assert records.bucket_key(rec["bucket"]) == shard["bucket"]
    recs.append(rec)
  return records.read_manifest(out), {r["source"]: r for r in recs}


def _write_jsonl(path, lines):
  with open(path, "w") as f:
    for line in lines:
      f.write(line if isinstance(line, str) else json.dumps(line))
      f.write("\n")
  return str(path)


def _sha256(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _dir_sha256(path, only=None):
  """A folder's fingerprint as svg_jax.autoencoder.path_fingerprint documents it: sha256 over
  its files' relative names and sha256s, in sorted order (those named in `only`, when given)."""
  h = hashlib.sha256()
  for name in sorted(os.listdir(path)):  # the demo text encoder folder is flat
    if only is None or name in only:
      h.update(f"{name}\0{_sha256(os.path.join(path, name))}\0".encode())
  return "sha256-dir:" + h.hexdigest()


def _bf16_close(got_bf16, want_f32):
  """max |got - want| in units of 2^-8 |want| (half a bf16 ulp at most): got is want rounded to
  bf16 when this is <= 1; fp32 noise (other batch padding, other device split) can flip a
  rounding near a midpoint, so callers allow 2 (one bf16 ulp)."""
  got = np.asarray(got_bf16, np.float32)
  want = np.asarray(want_f32, np.float32)
  err = np.abs(got - want)
  return float(np.max(err / (np.abs(want) * 2.0 ** -8 + 1e-6)))


def test_acceptance_two_real_images_plus_corrupt_and_missing(files, job_factory, references,
                                                             tmp_path):
  corrupt = tmp_path / "corrupt.png"
  corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
  jsonl = _write_jsonl(tmp_path / "train.jsonl", [
      {"path": f"{ASSETS}/hello.png", "prompt": "the word hello"},
      {"path": "corrupt.png", "prompt": "a broken file"},
      {"image_path": f"{ASSETS}/man.jpg", "super_high_quality_caption": "a man"},
      {"path": "missing.jpg", "prompt": "not there"},
  ])
  job = job_factory(resolution=256)
  out = str(tmp_path / "out")
  manifest = job.run(sources.list_inputs(jsonl, "jsonl", job.cfg), out)
  assert manifest == records.read_manifest(out)
  manifest, recs = _read_all(out)
  assert sorted(recs) == [f"{ASSETS}/hello.png", f"{ASSETS}/man.jpg"]
  bad = {b["key"]: b["reason"] for b in manifest["bad_inputs"]}
  assert set(bad) == {"corrupt.png", "missing.jpg"}
  assert "missing file" in bad["missing.jpg"]
  assert "corrupt" in bad["corrupt.png"]
  assert manifest["num_inputs"] == 4 and manifest["num_records"] == 2
  # hello.png is RGBA: converted (alpha on white), counted, not dropped.
  assert manifest["conversions"] == {"alpha_on_white": {"count": 1,
                                                        "examples": [f"{ASSETS}/hello.png"]}}
  assert manifest["buckets"] == {"12x20": 1, "16x16": 1}  # 320x192 and 256x256 pixels
  # Stats: the file's sha256, the row used (the file holds one row) and the bf16 rounding of
  # the official training (the default). Text: both files and every setting that changes the
  # features.
  text_dir = _dir_sha256(files["text"])
  tokenizer = _dir_sha256(files["text"], only=pc.TOKENIZER_FILES)  # its tokenizer files alone
  assert tokenizer != text_dir
  assert manifest["fingerprints"] == {
      "encoder": "sha256:" + _sha256(files["encoder"]),
      "statistics": "sha256:" + _sha256(files["stats"]) + ":row0:bf16",
      "text_encoder": f"model={text_dir};tokenizer={tokenizer};layer=-2;max_length="
                      f"{text_lib.TRAIN_MAX_LENGTH};system_prompt=auto;mode=features"}

  # A trainer can compute the same fingerprints from its config without loading any model.
  config = _config(files, resolution=256)
  assert pc.expected_fingerprints(config) == manifest["fingerprints"]
  config.autoencoder.bf16_stats = False
  assert pc.expected_fingerprints(config)["statistics"].endswith(":row0")
  config.precompute.hidden_layer = -1
  with pytest.raises(records.FingerprintMismatchError, match="text_encoder"):
    records.check_fingerprints(manifest, pc.expected_fingerprints(config))

  ref_ae, ref_te = references
  hist = {}
  for path, caption, prompt in (
      (f"{ASSETS}/hello.png", "the word hello", text_lib.BASE_SYSTEM_PROMPT),
      (f"{ASSETS}/man.jpg", "a man", text_lib.SUPER_HIGH_QUALITY_SYSTEM_PROMPT)):
    rec = recs[path]
    crop, (w, h) = ae_lib.preprocess(path, 256)
    want = ref_ae.encode(crop[None])[0]
    assert rec["latent"].dtype == ml_dtypes.bfloat16 and rec["latent"].shape == want.shape
    assert rec["bucket"] == (h // 16, w // 16)
    with Image.open(path) as im:
      assert rec["orig_size"] == im.size
    rel = _bf16_close(rec["latent"], want)
    print(f"{os.path.basename(path)}: latent vs SVGAutoencoder.encode: {rel:.3f} half-ulps")
    assert rel <= 2.0
    assert rec["caption"] == caption
    ids, mask = text_lib.tokenize(ref_te.tokenizer, [caption], prompt, text_lib.TRAIN_MAX_LENGTH)
    feats, lens = ref_te.encode_tokens(ids, mask)
    n = int(lens[0])
    assert rec["text_len"] == n == int(mask.sum()) and rec["text_features"].shape == (n, 128)
    rel = _bf16_close(rec["text_features"], np.asarray(feats)[0, :n])
    print(f"{os.path.basename(path)}: text features vs TextEncoder: {rel:.3f} half-ulps")
    assert rel <= 2.0
    hist[str(n)] = hist.get(str(n), 0) + 1
  assert manifest["text_len_histogram"] == dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
  # The unconditional features: "" -> <bos> only, no system prompt, bf16 precision.
  empty = np.load(os.path.join(out, pc.EMPTY_TEXT_FILE))
  feats, lens = ref_te([text_lib.UNCONDITIONAL])
  assert int(lens[0]) == 1 and empty.shape == (1, 128) and empty.dtype == np.float32
  assert _bf16_close(empty, np.asarray(feats)[0, :1]) <= 2.0
  assert np.array_equal(empty, empty.astype(ml_dtypes.bfloat16).astype(np.float32))
  assert manifest["empty_text"]["shape"] == [1, 128]

  # The training pipeline reads the output.
  it = pipeline.make_pipeline(out, {"per_process_batch_size": 1, "max_caption_len": 256,
                                    "num_threads": 0, "prefetch_buffer_size": 0},
                              process_index=0, process_count=1,
                              expected_fingerprints=manifest["fingerprints"])
  for _ in range(2):
    batch = next(it)
    rec = recs[str(batch["source"][0])]
    n = rec["text_len"]
    np.testing.assert_array_equal(batch["latent"][0], rec["latent"].astype(np.float32))
    np.testing.assert_array_equal(batch["text"][0, :n], rec["text_features"].astype(np.float32))
    assert batch["text_mask"][0].sum() == n


def _png(img, **kw):
  buf = io.BytesIO()
  img.save(buf, format="PNG", **kw)
  return buf.getvalue()


def _rgb(w, h, seed):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_every_bad_input_kind_is_reported_and_conversions_kept(job_factory, references, tmp_path):
  d = tmp_path / "imgs"
  d.mkdir()
  (d / "good.png").write_bytes(_png(_rgb(48, 40, 0)))
  (d / "zero.png").write_bytes(b"")
  (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all" * 8)
  whole = _png(_rgb(64, 64, 1))
  (d / "truncated.png").write_bytes(whole[:len(whole) // 2])
  (d / "tiny.png").write_bytes(_png(_rgb(8, 8, 2)))
  _rgb(40, 40, 3).convert("CMYK").save(d / "cmyk.jpg", format="JPEG")
  sixteen = np.random.default_rng(4).integers(0, 65536, (40, 40), dtype=np.uint16)
  Image.fromarray(sixteen).save(d / "sixteen.png")
  assert Image.open(d / "sixteen.png").mode.startswith("I")
  _rgb(40, 40, 5).convert("P").save(d / "palette.png")
  rgba = np.random.default_rng(6).integers(0, 256, (40, 40, 4), dtype=np.uint8)
  Image.fromarray(rgba, mode="RGBA").save(d / "rgba.png")
  Image.fromarray(np.random.default_rng(8).random((40, 40), np.float32), mode="F").save(
      d / "float_mode.tif")
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": a phone's portrait photo
  _rgb(48, 40, 9).save(d / "portrait.jpg", format="JPEG", exif=exif)
  lines = [
      {"path": "imgs/good.png", "prompt": "a red circle"},
      {"path": "imgs/portrait.jpg", "prompt": "a red circle"},
      {"path": "imgs/missing.png", "prompt": "a red circle"},
      {"path": "imgs/zero.png", "prompt": "a red circle"},
      {"path": "imgs/corrupt.jpg", "prompt": "a red circle"},
      {"path": "imgs/truncated.png", "prompt": "a red circle"},
      {"path": "imgs/tiny.png", "prompt": "a red circle"},
      {"path": "imgs/cmyk.jpg", "prompt": "a blue square"},
      {"path": "imgs/sixteen.png", "prompt": "a green triangle"},
      {"path": "imgs/palette.png", "prompt": "a white diamond"},
      {"path": "imgs/rgba.png", "super_high_quality_caption": "a purple circle"},
      {"path": "imgs/float_mode.tif", "prompt": "a red circle"},
      {"path": "imgs/good.png", "prompt": ""},
      {"path": "imgs/good.png", "prompt": "   \n"},
      {"path": "imgs/good.png", "prompt": 42},
      {"path": "imgs/good.png", "prompt": None},
      {"path": "imgs/good.png"},
      "{not json",
      "[1, 2, 3]",
      {"prompt": "no path"},
      "",  # blank lines are not inputs
  ]
  jsonl = _write_jsonl(tmp_path / "data.jsonl", lines)
  job = job_factory()
  out = str(tmp_path / "out")
  manifest = job.run(sources.list_inputs(jsonl, "jsonl", job.cfg), out)
  _, recs = _read_all(out)
  good = ["imgs/good.png", "imgs/portrait.jpg", "imgs/cmyk.jpg", "imgs/sixteen.png",
          "imgs/palette.png", "imgs/rgba.png"]
  assert sorted(recs) == sorted(good)
  assert {k: v["count"] for k, v in manifest["conversions"].items()} == {
      "cmyk": 1, "16bit": 1, "palette": 1, "alpha_on_white": 1, pc.EXIF_NOT_APPLIED: 1}
  assert recs["imgs/portrait.jpg"]["orig_size"] == (48, 40)  # as stored: not rotated
  assert manifest["conversions"]["cmyk"]["examples"] == ["imgs/cmyk.jpg"]
  got = [(b["key"], b["reason"]) for b in manifest["bad_inputs"]]
  want = [("imgs/missing.png", "missing file"), ("imgs/zero.png", "zero-byte"),
          ("imgs/corrupt.jpg", "corrupt"), ("imgs/truncated.png", "truncated"),
          ("imgs/tiny.png", "too small: 8x8"), ("imgs/float_mode.tif", "unsupported mode F"),
          ("imgs/good.png", "empty caption"), ("imgs/good.png", "empty caption"),
          ("imgs/good.png", "caption is not a string (int"),
          ("imgs/good.png", "caption is not a string (NoneType"),
          ("imgs/good.png", "neither 'super_high_quality_caption' nor 'prompt'"),
          ("data.jsonl:18", "not valid JSON"), ("data.jsonl:19", "a JSON list, not an object"),
          ("data.jsonl:20", "no 'path' / 'image_path'")]
  assert [k for k, _ in got] == [k for k, _ in want], got
  for (key, reason), (_, frag) in zip(got, want):
    assert frag in reason, (key, reason, frag)
  assert manifest["num_inputs"] == len(lines) - 1
  assert manifest["num_records"] + len(got) == manifest["num_inputs"]
  # The converted images' latents are the encoder's output on the documented conversions.
  ref_ae, _ = references
  for key in ("imgs/cmyk.jpg", "imgs/sixteen.png", "imgs/palette.png", "imgs/rgba.png"):
    crop, _ = ae_lib.preprocess(str(tmp_path / key), 64)
    assert _bf16_close(recs[key]["latent"], ref_ae.encode(crop[None])[0]) <= 2.0
  # The console summary names every bad input.
  text = pc.summary(manifest)
  for key, reason in got:
    assert f"bad input {key}: {reason}" in text
  assert "taken as stored, their EXIF orientation not applied (as the official loader): 1, e.g. " \
      "imgs/portrait.jpg" in text


def test_folder_input(job_factory, tmp_path):
  d = tmp_path / "folder"
  (d / "sub").mkdir(parents=True)
  _rgb(40, 48, 0).save(d / "a.png")
  (d / "a.txt").write_text("a red circle\n")
  _rgb(40, 40, 1).save(d / "sub" / "b.jpg")
  (d / "sub" / "b.txt").write_text("a blue square")
  _rgb(40, 40, 2).save(d / "no_caption.png")
  _rgb(40, 40, 3).save(d / "empty.png")
  (d / "empty.txt").write_text("  \n")
  (d / "notes.md").write_text("not an image")
  job = job_factory()
  items = sources.read_folder(str(d))
  assert [it.key for it in items] == ["a.png", "empty.png", "no_caption.png", "sub/b.jpg"]
  manifest = job.run(sources.list_inputs(str(d), "folder", job.cfg), str(tmp_path / "out"))
  _, recs = _read_all(str(tmp_path / "out"))
  assert recs["a.png"]["caption"] == "a red circle"  # the newline of the file is stripped
  assert sorted(recs) == ["a.png", "sub/b.jpg"]
  assert {b["key"]: b["reason"] for b in manifest["bad_inputs"]} == {
      "empty.png": "empty caption", "no_caption.png": "missing caption file no_caption.txt"}


def _demo_jsonl(tmp_path, n):
  root = str(tmp_path / "shapes")
  shapes.write_dataset(root, n, 0, 64)
  return os.path.join(root, "train.jsonl")


def test_a_ctrl_c_just_after_a_chunk_is_marked_done_counts_it(job_factory, tmp_path,
                                                             monkeypatch):
  """The line's count is what a rerun finds: a Ctrl-C while the finished chunk's scratch was
  removed (its chunk file written) said 0 chunks with chunk 0 done on disk."""
  jsonl = _demo_jsonl(tmp_path, 6)
  job = job_factory(records_per_shard=4)  # 2 chunks
  inputs = sources.list_inputs(jsonl, "jsonl", job.cfg)
  out = str(tmp_path / "out")
  real_rmtree = pc.shutil.rmtree

  def ctrl_c_after_chunk_0(path, *args, **kwargs):
    real_rmtree(path, *args, **kwargs)
    if os.path.isfile(pc._chunk_file(out, 0)):
      raise KeyboardInterrupt

  monkeypatch.setattr(pc.shutil, "rmtree", ctrl_c_after_chunk_0)
  with pytest.raises(pc.Interrupted, match="interrupted after 1 of 2 chunks"):
    job.run(inputs, out)


def test_a_ctrl_c_whose_exception_is_lost_still_stops_the_job(job_factory, tmp_path,
                                                              monkeypatch):
  """A KeyboardInterrupt raised where a library swallows it (Python code that a C extension calls
  and whose errors it clears; a gc callback) let the job run on to its end. It now stops before
  its next input, as after a Ctrl-C that propagates, and the rerun resumes."""
  jsonl = _demo_jsonl(tmp_path, 10)
  job = job_factory(records_per_shard=4)  # 3 chunks: 4 + 4 + 2 inputs
  inputs = sources.list_inputs(jsonl, "jsonl", job.cfg)
  out = str(tmp_path / "out")
  real_flush = pc.Precomputer._flush

  def swallowed_in_chunk_1(self, writer, group, stats):
    if os.path.isfile(pc._chunk_file(out, 0)) and not os.path.isfile(pc._chunk_file(out, 1)):
      try:
        signal.raise_signal(signal.SIGINT)  # through the handler the job installed
      except KeyboardInterrupt:
        pass  # lost on its way
    return real_flush(self, writer, group, stats)

  monkeypatch.setattr(pc.Precomputer, "_flush", swallowed_in_chunk_1)
  before = signal.getsignal(signal.SIGINT)  # pytest-xdist's workers ignore SIGINT
  with pytest.raises(pc.Interrupted, match=r"interrupted after (\d) of 3 chunks") as stopped:
    job.run(inputs, out)
  done = int(re.search(r"after (\d)", str(stopped.value)).group(1))
  assert done in (1, 2) and not os.path.isfile(pc._chunk_file(out, 2))
  assert done == len(glob.glob(os.path.join(out, pc.PROGRESS_DIR, "chunk-*.json")))
  assert signal.getsignal(signal.SIGINT) == before  # put back
  monkeypatch.setattr(pc.Precomputer, "_flush", real_flush)
  assert job.run(inputs, out)["num_records"] == 10


def test_a_run_interrupted_under_an_earlier_version_resumes(files, job_factory, tmp_path,
                                                           monkeypatch, capsys):
  """The plan an earlier version wrote for the same files (a tokenizer fingerprint that hashed the
  whole folder, TFDS inputs named by name/split/length) is this run's plan: the job resumes and
  the plan takes this version's fingerprints. Another tokenizer is still refused."""
  jsonl = _demo_jsonl(tmp_path, 10)
  job = job_factory(records_per_shard=4)  # 3 chunks
  listed = sources.list_inputs(jsonl, "jsonl", job.cfg)
  # Named as a TFDS input is now (read_tfds); the earlier form is its first part.
  inputs = sources.Inputs(listed.__getitem__, len(listed),
                          "tfds:shapes/train:10:sha256:" + "0" * 64)
  out = str(tmp_path / "out")
  real_flush = pc.Precomputer._flush

  def stop_in_chunk_1(self, *args):
    if os.path.isfile(pc._chunk_file(out, 0)):
      raise KeyboardInterrupt
    return real_flush(self, *args)

  monkeypatch.setattr(pc.Precomputer, "_flush", stop_in_chunk_1)
  with pytest.raises(pc.Interrupted, match="after 1 of 3 chunks"):
    job.run(inputs, out)
  monkeypatch.setattr(pc.Precomputer, "_flush", real_flush)
  plan_path = os.path.join(out, pc.PROGRESS_DIR, pc.PLAN_FILE)
  with open(plan_path) as f:
    plan = json.load(f)
  ours = plan["fingerprints"]["text_encoder"]
  tokenizer_files = f"tokenizer={_dir_sha256(files['text'], pc.TOKENIZER_FILES)};"
  assert tokenizer_files in ours and f"tokenizer={_dir_sha256(files['text'])}" not in ours

  def write_earlier(tokenizer):
    text = ours.replace(tokenizer_files, f"tokenizer={tokenizer};")
    earlier = dict(plan, inputs="tfds:shapes/train:10",
                   fingerprints=dict(plan["fingerprints"], text_encoder=text))
    with open(plan_path, "w") as f:
      json.dump(earlier, f)

  write_earlier("sha256-dir:" + "1" * 64)  # another tokenizer's folder
  with pytest.raises(InputError, match=r"different plan \(differs in \['fingerprints'\]\)"):
    job.run(inputs, out)
  write_earlier(_dir_sha256(files["text"]))  # this folder, hashed whole
  capsys.readouterr()
  assert job.run(inputs, out)["num_records"] == 10
  assert "written by an earlier svg-jax version for the same inputs and settings" in (
      capsys.readouterr().out)
  with open(plan_path) as f:
    assert json.load(f) == plan
  assert len(glob.glob(os.path.join(out, pc.PROGRESS_DIR, "chunk-*.json"))) == 3


def test_resume_skips_finished_chunks_and_redoes_a_partial_one(job_factory, tmp_path,
                                                               monkeypatch):
  jsonl = _demo_jsonl(tmp_path, 10)
  job = job_factory(records_per_shard=4)  # 3 chunks: 4 + 4 + 2 inputs
  inputs = sources.list_inputs(jsonl, "jsonl", job.cfg)
  full_out = str(tmp_path / "full")
  full = job.run(inputs, full_out)
  _, full_recs = _read_all(full_out)
  assert len(full_recs) == 10 and len(full["bad_inputs"]) == 0

  out = str(tmp_path / "resumed")
  calls = []
  real_flush = pc.Precomputer._flush

  def crash_in_chunk_1(self, writer, group, stats):
    if calls and calls[-1] == 1:
      real_flush(self, writer, group[:1], stats)  # a partial shard is being written ...
      raise KeyboardInterrupt("killed")  # ... when the job dies
    return real_flush(self, writer, group, stats)

  real_run_chunk = pc.Precomputer.run_chunk

  def spy(self, inputs, c, out, progress):
    calls.append(c)
    return real_run_chunk(self, inputs, c, out, progress)

  monkeypatch.setattr(pc.Precomputer, "run_chunk", spy)
  monkeypatch.setattr(pc.Precomputer, "_flush", crash_in_chunk_1)
  with pytest.raises(pc.Interrupted, match="interrupted after 1 of 3 chunks; rerun the same "
                     "command to resume"):
    job.run(inputs, out)
  assert calls == [0, 1]
  assert os.path.isfile(pc._chunk_file(out, 0)) and not os.path.isfile(pc._chunk_file(out, 1))
  assert not os.path.exists(os.path.join(out, records.MANIFEST_NAME))
  assert not [n for n in os.listdir(os.path.join(out, pc.PROGRESS_DIR)) if ".tmp-" in n]
  done0 = open(pc._chunk_file(out, 0)).read()
  # Debris of a harder kill: a stale shard of chunk 1 and a scratch folder.
  with open(os.path.join(out, "c000001-p000-4x4-00000.array_record"), "wb") as f:
    f.write(b"half a shard")
  os.makedirs(os.path.join(out, pc.PROGRESS_DIR, "chunk-000001.tmp-99999"))

  monkeypatch.setattr(pc.Precomputer, "_flush", real_flush)
  calls.clear()
  resumed = job.run(inputs, out)
  assert calls == [1, 2]  # chunk 0 skipped
  assert open(pc._chunk_file(out, 0)).read() == done0
  assert resumed == full
  _, recs = _read_all(out)
  assert recs.keys() == full_recs.keys()
  for key, rec in recs.items():
    for field, value in rec.items():
      if isinstance(value, np.ndarray):
        np.testing.assert_array_equal(value, full_recs[key][field])
      else:
        assert value == full_recs[key][field], (key, field)
  assert sorted(os.listdir(os.path.join(out, pc.PROGRESS_DIR))) == [
      "chunk-000000.json", "chunk-000001.json", "chunk-000002.json", pc.PLAN_FILE,
      "process-000.lock"]
  assert sorted(os.listdir(out)) == sorted(
      [s["name"] for s in full["shards"]] + [records.MANIFEST_NAME, pc.EMPTY_TEXT_FILE,
                                             pc.PROGRESS_DIR])
  # A third run has nothing to do; a run with another chunking is refused.
  calls.clear()
  assert job.run(inputs, out) == full and calls == []
  other = job_factory(records_per_shard=5)
  with pytest.raises(InputError, match=r"different plan \(differs in \['records_per_shard'\]\)"):
    other.run(inputs, out)
  # A shard deleted after the fact makes its chunk redo.
  os.remove(os.path.join(out, full["shards"][-1]["name"]))
  calls.clear()
  assert job_factory(records_per_shard=4).run(inputs, out) == full and calls == [2]
  # A dataset that another writer made is not overwritten.
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / records.MANIFEST_NAME).write_text("{}")
  with pytest.raises(InputError, match=r"holds a dataset not written by this precompute"):
    job.run(inputs, str(foreign))


def test_processes_split_the_chunks(job_factory, tmp_path):
  jsonl = _demo_jsonl(tmp_path, 7)
  single = job_factory(records_per_shard=2)
  inputs = sources.list_inputs(jsonl, "jsonl", single.cfg)
  want = single.run(inputs, str(tmp_path / "one"))
  _, want_recs = _read_all(str(tmp_path / "one"))
  out = str(tmp_path / "two")
  p1 = job_factory(records_per_shard=2, process_index=1, process_count=2)
  assert p1.run(inputs, out) is None  # chunks 1, 3 done; 0, 2 missing: no manifest yet
  assert not os.path.exists(os.path.join(out, records.MANIFEST_NAME))
  p0 = job_factory(records_per_shard=2, process_index=0, process_count=2)
  got = p0.run(inputs, out)
  names = [s["name"] for s in got["shards"]]
  assert all(n.startswith(f"c{c:06d}-p{c % 2:03d}-") for n in names for c in [int(n[1:7])])
  assert {int(n[1:7]) % 2 for n in names if "-p001-" in n} == {1}
  strip = lambda m: {k: v for k, v in m.items() if k != "shards"}
  assert strip(got) == strip(want)
  _, recs = _read_all(out)
  assert recs.keys() == want_recs.keys()
  for key in recs:
    np.testing.assert_array_equal(recs[key]["latent"], want_recs[key]["latent"])
    np.testing.assert_array_equal(recs[key]["text_features"], want_recs[key]["text_features"])


def test_uncompressed_shards_hold_the_same_records(job_factory, tmp_path):
  jsonl = _demo_jsonl(tmp_path, 3)
  got = {}
  for compression in ("zstd", "uncompressed"):
    job = job_factory(shard_compression=compression)
    manifest = job.run(sources.list_inputs(jsonl, "jsonl", job.cfg), str(tmp_path / compression))
    assert manifest["precompute"]["shard_compression"] == compression
    got[compression] = _read_all(str(tmp_path / compression))[1]
  assert got["zstd"].keys() == got["uncompressed"].keys()
  for key, rec in got["zstd"].items():
    np.testing.assert_array_equal(rec["latent"], got["uncompressed"][key]["latent"])
    np.testing.assert_array_equal(rec["text_features"], got["uncompressed"][key]["text_features"])
  with pytest.raises(ValueError, match="shard_compression 'lz4' is not one of"):
    pc.validate_config(_config({"encoder": "", "stats": "", "text": "t"},
                               shard_compression="lz4").precompute)


def test_token_ids_mode(job_factory, references, tmp_path):
  jsonl = _demo_jsonl(tmp_path, 3)
  job = job_factory(text_mode="token_ids")
  manifest = job.run(sources.list_inputs(jsonl, "jsonl", job.cfg), str(tmp_path / "out"))
  assert manifest["text"] == {"kind": "token_ids", "dim": None}
  _, recs = _read_all(str(tmp_path / "out"))
  _, te = references
  for item in shapes.read_split(str(tmp_path / "shapes"), "train"):
    rec = recs[os.path.relpath(item["path"], str(tmp_path / "shapes"))]
    ids = te.tokenizer(text_lib.BASE_SYSTEM_PROMPT + item["prompt"])["input_ids"]
    np.testing.assert_array_equal(rec["token_ids"], ids)
  empty = np.load(str(tmp_path / "out" / pc.EMPTY_TEXT_FILE))
  np.testing.assert_array_equal(empty, [te.tokenizer.bos_token_id])


def test_tfds_mock_data(job_factory, references, tmp_path):
  # tensorflow-datasets without TensorFlow: data_source and mock_data need no TF.
  import tensorflow_datasets as tfds

  tfds_datasets.define_captioned_images("TinyCaptions")
  job = job_factory(min_side=1)
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
    inputs = sources.list_inputs("tiny_captions", "tfds", job.cfg)
    source = tfds.data_source("tiny_captions", split="train")
    examples = [source[i] for i in range(5)]
    manifest = job.run(inputs, str(tmp_path / "out"))
  assert len(inputs) == 5 and manifest["num_records"] == 5, manifest["bad_inputs"]
  _, recs = _read_all(str(tmp_path / "out"))
  ref_ae, _ = references
  for i, ex in enumerate(examples):
    rec = recs[f"tiny_captions/train[{i}]"]
    assert rec["caption"] == ex["caption"]
    h, w = ex["image"].shape[:2]
    assert rec["orig_size"] == (w, h)
    crop, _ = ae_lib.preprocess(ex["image"], 64)
    assert _bf16_close(rec["latent"], ref_ae.encode(crop[None])[0]) <= 2.0


def test_helpers():
  assert [pc.text_pad_length(n, 256) for n in (1, 8, 9, 33, 200, 256)] == [8, 8, 16, 64, 256, 256]
  assert pc.text_pad_length(100, 96) == 96
  p = Progress(10, what="inputs", stream=io.StringIO(), min_interval=0.0)
  p.update(done=4, good=3)
  assert "4/10 inputs" in p.stream.getvalue() and "ETA" in p.stream.getvalue()
  p.update(done=6, good=6)
  assert p.stream.getvalue().endswith("\n")
  c = config_lib.precompute_defaults()
  c.update(text_mode="logits", output_dtype="float32", max_length=100, process_index=2)
  with pytest.raises(ValueError) as e:
    pc.validate_config(c)
  for frag in ("text_mode 'logits'", "output_dtype 'float32'", "max_length 100",
               "process_index and process_count"):
    assert frag in str(e.value)


def _config_flags(files, **paths):
  """launch/precompute.py's flags for the tiny encoder, its statistics and the text encoder;
  `paths` replaces some (encoder_path=..., text_encoder_dir=...)."""
  given = {"encoder_path": files["encoder"], "stats_path": files["stats"],
           "text_encoder_dir": files["text"], **paths}
  enc = dataclasses.asdict(ENC)
  return [f"--config.autoencoder.encoder_path={given['encoder_path']}",
          f"--config.autoencoder.stats_path={given['stats_path']}",
          f"--config.precompute.text_encoder_dir={given['text_encoder_dir']}",
          "--config.precompute.resolution=64", "--config.precompute.batch_size=4"] + [
      f"--config.autoencoder.encoder.{k}={v}" for k, v in enc.items()
      if k in ("dim", "depth", "num_heads", "ffn_hidden", "num_register_tokens")]


def test_cli_on_the_demo_dataset(files, tmp_path):
  jsonl = _demo_jsonl(tmp_path, 5)
  out = tmp_path / "records"
  env = dict(os.environ, XLA_FLAGS=script_runs.xla_flags(), JAX_PLATFORMS="cpu")
  cmd = [sys.executable, os.path.join(REPO, "launch", "precompute.py"), f"--input={jsonl}",
         "--input_format=jsonl", f"--out={out}", *_config_flags(files)]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  print(proc.stdout)
  assert "images/s" in proc.stdout and "bad inputs: 0" in proc.stdout
  assert f"captions cut to {text_lib.TRAIN_MAX_LENGTH} tokens" in proc.stdout
  assert "5/5 inputs" in proc.stderr and "ETA" in proc.stderr
  manifest, recs = _read_all(str(out))
  assert manifest["num_records"] == 5 and manifest["buckets"] == {"4x4": 5}
  assert manifest["text"] == {"kind": "text_features", "dim": 128}
  items = shapes.read_split(str(tmp_path / "shapes"), "train")
  assert sorted(r["caption"] for r in recs.values()) == sorted(i["prompt"] for i in items)


# ----------------------------------------------------------------------------- bad input: one line


@pytest.mark.parametrize("input_path, input_format, paths, message", [
    ("folder", "folder", dict(encoder_path="/nonexistent/dinov3.pth"),
     "input error: DINOv3 checkpoint not found: /nonexistent/dinov3.pth"),
    ("folder", "folder", dict(text_encoder_dir="/nonexistent/gemma"),
     "input error: text encoder folder /nonexistent/gemma does not exist"),
    ("/nonexistent/folder", "folder", {},
     "input error: input folder /nonexistent/folder does not exist"),
    ("folder", "jsonl", {}, "is a folder, not a jsonl file; for a folder of images with .txt "
     "captions give --input_format folder"),
    ("empty", "folder", {}, "no inputs found in "),
])
def test_cli_refuses_a_missing_model_or_unusable_input_in_one_line(files, tmp_path, input_path,
                                                                     input_format, paths, message):
  (tmp_path / "folder").mkdir()
  (tmp_path / "empty").mkdir()
  _rgb(40, 48, 0).save(tmp_path / "folder" / "a.png")
  (tmp_path / "folder" / "a.txt").write_text("a red circle")
  out = script_runs.run("precompute.py", f"--input={tmp_path / input_path}",
                        f"--input_format={input_format}", f"--out={tmp_path / 'out'}",
                        *_config_flags(files, **paths))
  line = script_runs.assert_one_line(out, message)
  if input_path == "empty":
    assert "image files (.png, .jpg, .jpeg, .webp, .bmp, .gif, .tif, .tiff)" in line


def test_no_record_at_all_is_one_line_in_precompute_and_in_training(files, tmp_path):
  """Inputs that all turn out bad: precompute writes its manifest (the bad inputs listed) and
  exits 2; training on that dataset is the config check's one line, before any state is built
  (not Grain's error on no buckets)."""
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "a.png").write_bytes(b"")
  (tmp_path / "in" / "a.txt").write_text("a red circle")
  records_dir = tmp_path / "records"
  out = script_runs.run("precompute.py", f"--input={tmp_path / 'in'}", "--input_format=folder",
                        f"--out={records_dir}", *_config_flags(files))
  script_runs.assert_one_line(out, "input error: none of the 1 inputs gave a record")
  assert "bad input a.png: empty (zero-byte) data" in out.stdout
  manifest = records.read_manifest(str(records_dir))
  assert manifest["num_records"] == 0 and [b["key"] for b in manifest["bad_inputs"]] == ["a.png"]
  out = script_runs.run("train.py", "--config", os.path.join(REPO, "configs", "tiny.py"),
                        "--workdir", tmp_path / "run", f"--config.data.path={records_dir}",
                        f"--config.model.in_channels={ENC.dim}", "--config.model.cap_feat_dim=128")
  script_runs.assert_one_line(out, f"config error: data.path '{records_dir}' holds no records")
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_folder_reports_unsupported_images_and_captions_without_an_image(job_factory, tmp_path):
  d = tmp_path / "folder"
  d.mkdir()
  _rgb(40, 48, 0).save(d / "a.png")
  (d / "a.txt").write_text("a red circle")
  (d / "photo.heic").write_bytes(b"not decodable here")
  (d / "photo.txt").write_text("a cat")
  (d / "orphan.txt").write_text("a dog")
  (d / "notes.md").write_text("no caption: not an input")
  job = job_factory()
  manifest = job.run(sources.list_inputs(str(d), "folder", job.cfg), str(tmp_path / "out"))
  supported = ", ".join(sources.IMAGE_EXTENSIONS)
  assert {b["key"]: b["reason"] for b in manifest["bad_inputs"]} == {
      "photo.heic": f"unsupported image type .heic (supported: {supported})",
      "orphan.txt": f"caption file without an image (no orphan with one of {supported})"}
  assert manifest["num_records"] == 1 and manifest["num_inputs"] == 3
  text = pc.summary(manifest)
  assert "bad inputs: 2" in text and "bad input photo.heic: unsupported image type .heic" in text


# ----------------------------------------------------------------------------- one input's failure


def test_a_decoder_crash_or_a_record_that_cannot_be_stored_is_that_input_s_bad_input(
    job_factory, references, tmp_path, monkeypatch):
  """Backstops behind sources' checks: a decoder's exception of its own type (PIL raised
  `TypeError: Missing dimensions` on a damaged TIFF), a key msgpack cannot store (a non-UTF-8 file
  name as Python reads it) and a caption the tokenizer refuses (a lone surrogate) are bad inputs
  of their own; the rest of their batch is written."""
  for i in range(4):
    _rgb(40, 40, i).save(tmp_path / f"ok{i}.png")
  _rgb(40, 40, 9).save(tmp_path / "damaged.tif")
  real_open = images.open_rgb

  def open_rgb(src, *args, **kwargs):
    if str(src).endswith("damaged.tif"):
      raise TypeError("Missing dimensions")
    return real_open(src, *args, **kwargs)

  monkeypatch.setattr(images, "open_rgb", open_rgb)
  # Behind sources' own refusal of such captions: what the tokenizer does with the ones it lets by.
  monkeypatch.setattr(sources, "check_caption", lambda caption: caption)
  surrogate_key = "bad\udcffname.png"
  item = lambda key, name, caption: sources.Item(key, str(tmp_path / name), caption)  # noqa: E731
  items = [item("ok0.png", "ok0.png", "a red circle"),
           item(surrogate_key, "ok0.png", "a blue square"),
           item("ok1.png", "ok1.png", "a green triangle"),
           item("lone.png", "ok1.png", "lone \ud800 surrogate"),  # the batch of 4 is flushed here
           item("ok2.png", "ok2.png", "a white diamond"),
           item("damaged.tif", "damaged.tif", "a red circle"),
           item("ok3.png", "ok3.png", "a purple circle")]
  job = job_factory()
  out = str(tmp_path / "out")
  manifest = job.run(sources.Inputs.from_items(items), out)
  _, recs = _read_all(out)
  assert sorted(recs) == ["ok0.png", "ok1.png", "ok2.png", "ok3.png"]
  bad = {b["key"]: b["reason"] for b in manifest["bad_inputs"]}
  assert bad.keys() == {surrogate_key, "lone.png", "damaged.tif"}
  assert bad["damaged.tif"] == "TypeError: Missing dimensions"
  assert bad[surrogate_key].startswith("cannot serialize the record (UnicodeEncodeError: "), bad
  assert bad["lone.png"].startswith("caption cannot be tokenized (TypeError: "), bad
  assert manifest["num_records"] == 4 and manifest["num_inputs"] == 7
  ref_ae, _ = references
  for key in recs:
    crop, _ = ae_lib.preprocess(str(tmp_path / key), 64)
    assert _bf16_close(recs[key]["latent"], ref_ae.encode(crop[None])[0]) <= 2.0
  assert recs["ok1.png"]["caption"] == "a green triangle"
  assert "bad input bad\\udcffname.png: cannot serialize" in pc.summary(manifest)


def test_captions_longer_than_max_length_are_cut_and_counted(job_factory, references, tmp_path):
  """The official truncation at max_length tokens (system prompt and <bos> included) is kept and
  counted; a caption of exactly max_length tokens is not cut."""
  _, te = references

  def tokens(caption):
    return len(te.tokenizer(text_lib.BASE_SYSTEM_PROMPT + caption)["input_ids"])

  words = " ".join(["a red circle left of a blue square"] * 60).split()
  exact = next(" ".join(words[:k]) for k in range(len(words))
               if tokens(" ".join(words[:k])) == text_lib.TRAIN_MAX_LENGTH)
  long = " ".join(words)
  assert tokens(long) > text_lib.TRAIN_MAX_LENGTH
  for name in ("short", "exact", "long"):
    _rgb(40, 40, 0).save(tmp_path / f"{name}.png")
  jsonl = _write_jsonl(tmp_path / "data.jsonl", [
      {"path": "short.png", "prompt": "a red circle"}, {"path": "exact.png", "prompt": exact},
      {"path": "long.png", "prompt": long}])
  job = job_factory()
  out = str(tmp_path / "out")
  manifest = job.run(sources.list_inputs(jsonl, "jsonl", job.cfg), out)
  _, recs = _read_all(out)
  assert recs["long.png"]["text_len"] == recs["exact.png"]["text_len"] == text_lib.TRAIN_MAX_LENGTH
  assert recs["long.png"]["caption"] == long  # the record keeps the whole caption text
  assert manifest["truncated_captions"] == {"count": 1, "max_length": text_lib.TRAIN_MAX_LENGTH,
                                            "examples": ["long.png"]}
  assert (f"captions cut to {text_lib.TRAIN_MAX_LENGTH} tokens (system prompt and <bos> included, "
          "the official truncation): 1, e.g. long.png") in pc.summary(manifest)


# ----------------------------------------------------------------------------- the output folder


def test_a_second_run_of_the_same_process_on_the_output_is_refused(job_factory, tmp_path):
  """A run holds a lock per process index in <out>/progress/ (here another process holds it): a
  second run of that index is refused and leaves the first run's scratch folder alone; another
  index is another lock; once the holder ends, a run goes on."""
  jsonl = _demo_jsonl(tmp_path, 3)
  job = job_factory()
  inputs = sources.list_inputs(jsonl, "jsonl", job.cfg)
  out = tmp_path / "out"
  (out / pc.PROGRESS_DIR).mkdir(parents=True)
  scratch = out / pc.PROGRESS_DIR / "chunk-000000.tmp-424242"  # the running job's
  scratch.mkdir()
  holder = subprocess.Popen(
      [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a'); "
       "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
       str(out / pc.PROGRESS_DIR / "process-000.lock")],
      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(InputError, match=re.escape(f"another precompute is writing {out} "
                                                   "(process 0)")):
      job.run(inputs, str(out))
    assert scratch.is_dir()
    other = job_factory(process_index=1, process_count=2)  # one chunk, process 0's
    assert other.run(inputs, str(out)) is None
  finally:
    holder.stdin.close()
    holder.wait(timeout=60)
  manifest = job.run(inputs, str(out))
  assert manifest["num_records"] == 3
  assert not scratch.exists()  # its owner is gone: stale


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_cli_refuses_an_output_folder_it_cannot_make_before_loading_models(files, tmp_path, where):
  (tmp_path / "in").mkdir()
  _rgb(40, 48, 0).save(tmp_path / "in" / "a.png")
  (tmp_path / "in" / "a.txt").write_text("a red circle")
  (tmp_path / "taken").write_text("a user's file")
  out = tmp_path / "taken" if where == "a file" else tmp_path / "taken" / "records"
  # The models do not exist: the output folder is checked first.
  run = script_runs.run("precompute.py", f"--input={tmp_path / 'in'}", "--input_format=folder",
                        f"--out={out}", *_config_flags(files, encoder_path="/nonexistent/e.pth",
                                                       text_encoder_dir="/nonexistent/gemma"))
  script_runs.assert_one_line(run, f"input error: output folder {out} cannot be made: "
                              f"{tmp_path / 'taken'} is a file")
  assert (tmp_path / "taken").read_text() == "a user's file"


def _cli_command(files, jsonl, out, *flags):
  return [sys.executable, os.path.join(REPO, "launch", "precompute.py"), f"--input={jsonl}",
          "--input_format=jsonl", f"--out={out}", *_config_flags(files), *flags]


def _cli_env():
  env = dict(os.environ, XLA_FLAGS=script_runs.xla_flags(), JAX_PLATFORMS="cpu")
  return env


def _scratch_left(out):
  return [p for p in glob.glob(os.path.join(out, "**", "*"), recursive=True) if ".tmp-" in p]


def test_cli_full_disk_is_one_line_and_a_rerun_resumes(files, tmp_path):
  """Files may not grow past 16 KiB (`ulimit -f`: EFBIG, as on a full disk; Python ignores the
  SIGXFSZ that comes with it): the first shard's write fails. One line with the OS reason
  first, no scratch left behind; the same command without the limit finishes the job."""
  jsonl = _demo_jsonl(tmp_path, 12)
  out = tmp_path / "records"
  command = _cli_command(files, jsonl, out, "--config.precompute.records_per_shard=4")
  # Without the compilation cache: a cache miss would be written under the same limit, and
  # JAX warns of it (two lines of its own beside the job's; a real disk of records is not the
  # cache's).
  run = subprocess.run(["bash", "-c", 'ulimit -f 16 && exec "$@"', "bash", *command],
                       capture_output=True, text=True,
                       env=dict(_cli_env(), JAX_COMPILATION_CACHE_DIR=""), cwd=REPO, timeout=300)
  line = script_runs.assert_one_line(
      run, "write error: File too large [errno 27]; OSError: ",
      f"writing {out} stopped after 0 of 3 chunks", "rerun to resume")
  assert "Traceback" not in run.stderr, line
  assert _scratch_left(str(out)) == []
  assert not glob.glob(str(out / "*.array_record"))
  run = subprocess.run(command, capture_output=True, text=True, env=_cli_env(), cwd=REPO,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  manifest, recs = _read_all(str(out))
  assert manifest["num_records"] == len(recs) == 12


@pytest.mark.serial  # the signal must come while the job runs: not on cores other tests share
def test_cli_ctrl_c_is_one_line_exit_130_and_a_rerun_resumes(files, job_factory, tmp_path):
  """SIGINT once the first chunk is done: one line, exit 130, no scratch left; the finished
  chunks are those the line counts, and the same job goes on from them."""
  jsonl = _demo_jsonl(tmp_path, 1000)  # seconds of work after the first chunk
  out = tmp_path / "records"
  command = _cli_command(files, jsonl, out, "--config.precompute.records_per_shard=20")
  # Niced: the job takes every core, and this process must see chunk 0 within the seconds left.
  proc = subprocess.Popen(["nice", "-n", "10", *command], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=_cli_env(), cwd=REPO)
  try:
    deadline = time.monotonic() + 240
    while not os.path.exists(pc._chunk_file(str(out), 0)) and proc.poll() is None:
      assert time.monotonic() < deadline, "no chunk finished in 240 s"
      time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
  finally:
    proc.kill()
  lines = script_runs.error_lines(stderr)
  assert proc.returncode == 130 and len(lines) == 1, (proc.returncode, stderr[-3000:])
  match = re.fullmatch(r"precompute: interrupted after (\d+) of 50 chunks; rerun the same command "
                       r"to resume", lines[0])
  assert match and 1 <= int(match.group(1)) < 50, lines[0]
  done = sorted(glob.glob(os.path.join(out, pc.PROGRESS_DIR, "chunk-*.json")))
  assert len(done) == int(match.group(1))
  assert _scratch_left(str(out)) == []
  # The same job in this process (the CLI's settings) does the rest.
  job = job_factory(records_per_shard=20, min_side=64)
  manifest = job.run(sources.list_inputs(jsonl, "jsonl", job.cfg), str(out))
  assert manifest["num_records"] == 1000
