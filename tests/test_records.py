"""Record schema, shards and manifest: round trips, an independent parse of the bytes with plain
msgpack/numpy, Grain's own ArrayRecord reader, and every documented error."""
import json
import os
import subprocess
import sys
import textwrap
import zlib

import ml_dtypes
import msgpack
import numpy as np
import pytest
from grain.sources import ArrayRecordDataSource

from svg_jax.data import records as R
from svg_jax.data import synthetic


def _record(text_kind="text_features", h=3, w=5, c=4, length=7, dim=6, seed=0):
  rng = np.random.default_rng(seed)
  rec = {
      "latent": rng.standard_normal((h, w, c)).astype(np.float32),
      "caption": "a red cube left of a blue ball",
      "text_len": length - 2,
      "bucket": (h, w),
      "orig_size": (16 * w + 3, 16 * h + 1),
      "source": f"unit/{seed}",
  }
  if text_kind == "text_features":
    rec["text_features"] = rng.standard_normal((length, dim)).astype(np.float32)
  else:
    rec["token_ids"] = rng.integers(0, 1000, size=length).astype(np.int64)
  return rec


@pytest.mark.parametrize("text_kind", ["text_features", "token_ids"])
def test_round_trip(text_kind):
  rec = _record(text_kind)
  out = R.decode_record(R.encode_record(rec))
  assert set(out) == set(rec)
  bf16 = np.dtype(ml_dtypes.bfloat16)
  assert out["latent"].dtype == bf16
  np.testing.assert_array_equal(out["latent"], rec["latent"].astype(bf16))
  if text_kind == "text_features":
    assert out["text_features"].dtype == bf16
    np.testing.assert_array_equal(out["text_features"], rec["text_features"].astype(bf16))
  else:
    assert out["token_ids"].dtype == np.int32
    np.testing.assert_array_equal(out["token_ids"], rec["token_ids"])
  assert out["bucket"] == (3, 5) and out["orig_size"] == (83, 49)
  assert out["caption"] == rec["caption"] and out["source"] == rec["source"]
  assert out["text_len"] == 5 and isinstance(out["text_len"], int)


def _bf16_bits(x):
  """float32 -> bf16 bit patterns, rounded to nearest even (the top 16 bits of float32 after
  adding 0x7fff plus the lowest kept bit); finite inputs only."""
  u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
  return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _check_bf16_entry(entry, original):
  """A bf16 array entry read with numpy alone: little-endian u16 bit patterns of `original`
  rounded to nearest even, so within 2^-8 relative of it once widened back to float32."""
  assert entry["dtype"] == "bfloat16" and entry["shape"] == list(original.shape)
  assert len(entry["data"]) == 2 * original.size
  bits = np.frombuffer(entry["data"], "<u2").reshape(original.shape)
  np.testing.assert_array_equal(bits, _bf16_bits(original))
  as_f32 = (bits.astype(np.uint32) << 16).view(np.float32)
  np.testing.assert_allclose(as_f32, original, rtol=2 ** -8)


@pytest.mark.parametrize("text_kind", ["text_features", "token_ids"])
def test_bytes_parse_with_plain_msgpack_and_numpy(text_kind):
  """The documented wire format read without svg_jax: envelope, crc32, raw little-endian arrays
  (bf16 latent and text features, int32 token ids)."""
  rec = _record(text_kind)
  outer = msgpack.unpackb(R.encode_record(rec), raw=False)
  assert outer["schema_version"] == 1 and outer["crc32"] == zlib.crc32(outer["body"])
  body = msgpack.unpackb(outer["body"], raw=False)
  assert set(body) & {"text_features", "token_ids"} == {text_kind}
  _check_bf16_entry(body["latent"], rec["latent"])
  if text_kind == "text_features":
    _check_bf16_entry(body["text_features"], rec["text_features"])
  else:
    ids = body["token_ids"]
    assert ids["dtype"] == "int32" and ids["shape"] == [7] and len(ids["data"]) == 7 * 4
    np.testing.assert_array_equal(np.frombuffer(ids["data"], "<i4"), rec["token_ids"])
  assert body["bucket"] == [3, 5] and body["orig_size"] == [83, 49] and body["text_len"] == 5


def _craft(body_fields, version=R.SCHEMA_VERSION):
  body = msgpack.packb(body_fields, use_bin_type=True)
  return msgpack.packb({"schema_version": version, "crc32": zlib.crc32(body), "body": body},
                       use_bin_type=True)


def _body(rec):
  return msgpack.unpackb(msgpack.unpackb(R.encode_record(rec), raw=False)["body"], raw=False)


def test_decode_errors_name_the_problem():
  good = R.encode_record(_record())
  body = _body(_record())
  with pytest.raises(R.BadRecordError, match="wrong schema version 2 .this code reads 1"):
    R.decode_record(_craft(body, version=2))
  for cut in (1, 10, len(good) // 2, len(good) - 1):
    with pytest.raises(R.BadRecordError, match="truncated or corrupt"):
      R.decode_record(good[:cut])
  with pytest.raises(R.BadRecordError, match="trailing bytes"):
    R.decode_record(good + b"\x00")
  flipped = bytearray(good)
  flipped[len(good) // 2] ^= 0x40
  with pytest.raises(R.BadRecordError, match="crc32 mismatch|truncated or corrupt"):
    R.decode_record(bytes(flipped))
  with pytest.raises(R.BadRecordError, match=r"missing fields \['caption', 'source'\]"):
    R.decode_record(_craft({k: v for k, v in body.items() if k not in ("caption", "source")}))
  with pytest.raises(R.BadRecordError, match=r"unexpected fields \['extra'\]"):
    R.decode_record(_craft({**body, "extra": 1}))
  b = dict(body)
  b["latent"] = {**b["latent"], "shape": [3, 5, 5]}
  with pytest.raises(R.BadRecordError, match="latent: 120 data bytes but shape .3, 5, 5. of "
                     "bfloat16 needs 150"):
    R.decode_record(_craft(b))
  b = dict(body)
  b["latent"] = {**b["latent"], "dtype": "float32", "shape": [3, 5, 2]}
  with pytest.raises(R.BadRecordError, match="latent: dtype 'float32', schema says 'bfloat16'"):
    R.decode_record(_craft(b))
  with pytest.raises(R.BadRecordError, match=r"bucket \(5, 3\) does not match latent shape"):
    R.decode_record(_craft({**body, "bucket": [5, 3]}))
  with pytest.raises(R.BadRecordError, match=r"text_len 8 outside \[1, 7\]"):
    R.decode_record(_craft({**body, "text_len": 8}))
  with pytest.raises(R.BadRecordError, match="record must be bytes"):
    R.decode_record("not bytes")


def test_encode_errors():
  rec = _record()
  both = {**rec, "token_ids": np.arange(7)}
  with pytest.raises(R.BadRecordError, match="need exactly one of"):
    R.encode_record(both)
  no_text = {k: v for k, v in rec.items() if k != "text_features"}
  with pytest.raises(R.BadRecordError, match="need exactly one of"):
    R.encode_record(no_text)
  bad = dict(rec)
  bad["latent"] = rec["latent"].copy()
  bad["latent"][0, 0, 0] = np.nan
  with pytest.raises(R.BadRecordError, match="latent: contains NaN or Inf"):
    R.encode_record(bad)
  with pytest.raises(R.BadRecordError, match="latent: expected 3 dims"):
    R.encode_record({**rec, "latent": rec["latent"][0]})
  with pytest.raises(R.BadRecordError, match="orig_size: values must be positive"):
    R.encode_record({**rec, "orig_size": (0, 4)})
  with pytest.raises(R.BadRecordError, match="text_len 0 outside"):
    R.encode_record({**rec, "text_len": 0})
  with pytest.raises(R.BadRecordError, match="token_ids: expected integers"):
    R.encode_record({**_record("token_ids"), "token_ids": np.zeros(7, np.float32)})


def test_shard_writer_is_atomic_and_readable_by_grain(tmp_path):
  path = str(tmp_path / "s.array_record")
  payloads = [R.encode_record(_record(seed=i)) for i in range(5)]
  with R.ShardWriter(path) as w:
    for p in payloads:
      w.write(p)
    assert not os.path.exists(path)  # nothing under the final name until close
  assert os.listdir(tmp_path) == ["s.array_record"]
  assert list(R.read_shard(path)) == payloads
  # Grain's ArrayRecord source (a reader nobody here wrote) sees the same records.
  src = ArrayRecordDataSource([path])
  assert len(src) == 5 and [src[i] for i in range(5)] == payloads
  # On an exception nothing is left behind.
  path2 = str(tmp_path / "t.array_record")
  with pytest.raises(RuntimeError):
    with R.ShardWriter(path2) as w:
      w.write(payloads[0])
      raise RuntimeError("boom")
  assert sorted(os.listdir(tmp_path)) == ["s.array_record"]


def test_a_write_the_file_system_refuses_is_one_os_error_and_leaves_nothing(tmp_path):
  """Under `ulimit -f` (EFBIG, a full disk as a writer sees it; Python ignores SIGXFSZ) the
  shard's close fails: the error is an OSError with the reason, not ArrayRecord's RuntimeError
  raised a second time by the abort, and no temporary file stays."""
  script = textwrap.dedent("""
      import os, sys
      import numpy as np
      from svg_jax.data import records as R
      out = sys.argv[1]
      rng = np.random.default_rng(0)
      try:
        with R.DatasetWriter(out) as writer:
          for i in range(8):
            writer.add({"latent": rng.standard_normal((8, 8, 64)), "caption": "c",
                        "text_features": rng.standard_normal((16, 128)), "text_len": 16,
                        "bucket": (8, 8), "orig_size": (128, 128), "source": f"k{i}"})
      except BaseException as e:
        print(type(e).__name__, getattr(e, "errno", None), getattr(e, "strerror", None),
              sorted(os.listdir(out)))
      """)
  out = tmp_path / "shards"
  run = subprocess.run(["bash", "-c", 'ulimit -f 32 && exec "$@"', "bash", sys.executable, "-c",
                        script, str(out)], capture_output=True, text=True, timeout=120)
  assert run.stdout.strip() == "OSError 27 File too large []", (run.stdout, run.stderr[-3000:])


def test_uncompressed_shards_read_back_the_same_and_are_larger(tmp_path):
  """Compressible records (a constant latent, like a plain background): the zstd shard is
  compressed; the uncompressed one and a writer's default hold every byte; all read back
  identically through Grain."""
  rec = _record(h=16, w=16, c=128)
  rec["latent"] = np.ones_like(rec["latent"])
  payloads = [R.encode_record(rec)] * 16  # ~1 MB: files grow in 128 KiB steps
  sizes = {}
  for compression in ("zstd", "uncompressed", None):  # None: the writer's default
    path = str(tmp_path / f"{compression}.array_record")
    with (R.ShardWriter(path) if compression is None else R.ShardWriter(path, compression)) as w:
      for p in payloads:
        w.write(p)
    src = ArrayRecordDataSource([path])
    assert [src[i] for i in range(len(src))] == payloads
    sizes[compression] = os.path.getsize(path)
  assert min(sizes["uncompressed"], sizes[None]) >= sum(map(len, payloads)) > 4 * sizes["zstd"]
  with pytest.raises(ValueError, match="unknown shard compression 'lz4'"):
    R.DatasetWriter(tmp_path / "d", compression="lz4")
  assert not os.path.exists(tmp_path / "d" / R.MANIFEST_NAME)


def test_open_shard_errors_name_the_file(tmp_path):
  good = str(tmp_path / "good.array_record")
  with R.ShardWriter(good) as w:
    for i in range(3):
      w.write(R.encode_record(_record(seed=i)))
  data = open(good, "rb").read()
  garbage, trunc = str(tmp_path / "garbage.array_record"), str(tmp_path / "trunc.array_record")
  open(garbage, "wb").write(os.urandom(4096))
  open(trunc, "wb").write(data[: len(data) // 3])
  for p in (garbage, trunc):
    with pytest.raises(R.CorruptShardError, match=f"shard {p}: not a readable ArrayRecord"):
      R.open_shard(p)
  with pytest.raises(R.CorruptShardError, match="missing.array_record: file does not exist"):
    R.open_shard(str(tmp_path / "missing.array_record"))
  with pytest.raises(R.CorruptShardError, match="holds 3 records, the manifest says 4"):
    R.open_shard(good, expected_records=4)
  R.open_shard(good, expected_records=3).close()


def test_manifest_round_trip_validation_and_fingerprints(tmp_path):
  manifest = synthetic.write_random_dataset(tmp_path / "d", buckets=[(2, 2), (2, 3)], num_records=[5, 3],
                                            records_per_shard=2, latent_channels=3, text_dim=4)
  assert manifest == json.load(open(tmp_path / "d" / "manifest.json"))
  assert manifest["schema_version"] == 1 and manifest["num_records"] == 8
  assert manifest["buckets"] == {"2x2": 5, "2x3": 3}
  assert [s["num_records"] for s in manifest["shards"] if s["bucket"] == "2x2"] == [2, 2, 1]
  assert manifest["text"] == {"kind": "text_features", "dim": 4}
  assert manifest["latent_channels"] == 3 and manifest["bad_inputs"] == []
  R.check_fingerprints(manifest, {"encoder": "test-encoder", "statistics": "test-statistics"})
  with pytest.raises(R.FingerprintMismatchError) as e:
    R.check_fingerprints(manifest, {"encoder": "dinov3-x", "statistics": "test-statistics",
                                    "text_encoder": "gemma", "tokenizer": "sp-1"})
  msg = str(e.value)
  assert "encoder: dataset 'test-encoder' != expected 'dinov3-x'" in msg
  assert "text_encoder: dataset 'test-text_encoder' != expected 'gemma'" in msg
  assert "tokenizer: dataset has no fingerprint" in msg and "statistics: " not in msg
  broken = dict(manifest, buckets={"2x2": 4, "2x3": 3})
  with pytest.raises(R.ManifestError, match="disagree with the shard list"):
    R.write_manifest(tmp_path, broken)
  with pytest.raises(R.ManifestError, match=r"missing keys \['fingerprints'\]"):
    R.validate_manifest({k: v for k, v in manifest.items() if k != "fingerprints"})
  with pytest.raises(R.ManifestError, match="no manifest"):
    R.read_manifest(tmp_path)
  with pytest.raises(FileExistsError):
    R.DatasetWriter(tmp_path / "d")


def test_dataset_writer_reports_bad_inputs_and_rejects_mixed_layouts(tmp_path):
  with R.DatasetWriter(tmp_path, records_per_shard=4, fingerprints={"encoder": "e"}) as w:
    w.add(_record(seed=0))
    w.report_bad("img/17.jpg", "truncated JPEG")
    with pytest.raises(R.BadRecordError, match="differs from the dataset's"):
      w.add(_record(dim=5, seed=1))
  m = R.read_manifest(tmp_path)
  assert m["bad_inputs"] == [{"key": "img/17.jpg", "reason": "truncated JPEG"}]
  assert m["num_records"] == 1 and m["fingerprints"] == {"encoder": "e"}


@pytest.mark.parametrize("text_kind", ["text_features", "token_ids"])
def test_random_dataset_contents(tmp_path, text_kind):
  m = synthetic.write_random_dataset(tmp_path, buckets=[(2, 4), (3, 3)], num_records=9, text_kind=text_kind,
                                     caption_len=(2, 5), latent_channels=5, text_dim=7, seed=3)
  assert m["buckets"] == {"2x4": 5, "3x3": 4}
  seen = []
  for shard, rec in R.iter_records(tmp_path):
    assert R.bucket_key(rec["bucket"]) == shard["bucket"]
    assert rec["latent"].shape == rec["bucket"] + (5,)
    assert 3 <= rec["text_len"] <= 6 and len(rec["caption"].split()) == rec["text_len"] - 1
    if text_kind == "text_features":
      assert rec["text_features"].shape == (rec["text_len"], 7)
    else:
      assert rec["token_ids"][0] == synthetic.BOS_ID and rec["token_ids"].shape == (rec["text_len"],)
    seen.append(rec["source"])
  assert len(set(seen)) == 9


def _r2_from_words(directory, vocab):
  """R^2 of a least-squares fit of the spatially averaged latent on bag-of-words caption counts."""
  x, y = [], []
  for _, rec in R.iter_records(directory):
    bow = np.zeros(vocab)
    for word in rec["caption"].split():
      bow[int(word[1:])] += 1
    x.append(bow / max(bow.sum(), 1))
    y.append(rec["latent"].astype(np.float32).mean((0, 1)))
  x, y = np.array(x), np.array(y)
  coef, *_ = np.linalg.lstsq(x, y, rcond=None)
  return 1 - ((x @ coef - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()


def test_learnable_data_is_a_function_of_the_caption(tmp_path):
  kw = dict(buckets=[(4, 4)], num_records=160, latent_channels=4, text_dim=4, vocab_size=10,
            caption_len=(1, 4), records_per_shard=64)
  synthetic.write_random_dataset(tmp_path / "learn", learnable=True, **kw)
  synthetic.write_random_dataset(tmp_path / "noise", learnable=False, **kw)
  assert _r2_from_words(str(tmp_path / "learn"), 10) > 0.95
  assert _r2_from_words(str(tmp_path / "noise"), 10) < 0.3
