"""Latent statistics: the official file, torch's arithmetic (fp32 and bf16), the demo format.

The official file is read without torch (`load_torch_file`); torch reads the same file as the
independent reference, and the normalization is compared with the official expression evaluated
by torch on NCHW features (docs/reference.md §2.3).
"""
import hashlib
import os

import jax
import numpy as np
import pytest
import torch

from svg_jax import assets
from svg_jax import latent_stats as ls
from svg_jax.input_errors import InputError

STATS_FILE = assets.OFFICIAL_LATENT_STATS
OFFICIAL_SHA256 = "a504c54c6775f4e418f549915405a5d31ad685dca73d132b34b68cee60e5edd6"


@pytest.fixture(scope="module")
def official():
  assert os.path.isfile(STATS_FILE), f"missing test asset {STATS_FILE}"
  return ls.load_latent_stats(STATS_FILE)


@pytest.fixture(scope="module")
def torch_stats():
  d = torch.load(STATS_FILE, map_location="cpu", weights_only=True)
  return d["mean"][-1], d["std"][-1]


def test_row_11_values_from_the_reference(official):
  # docs/reference.md §2.3 sanity values (6 decimals as printed there).
  np.testing.assert_allclose(official.mean[:6], [-0.131083, 0.010059, -0.161521, 0.037100,
                                                 0.016241, -0.107212], atol=1e-6)
  np.testing.assert_allclose(official.std[:6], [0.392849, 0.375289, 0.370822, 0.395598,
                                                0.345220, 0.405549], atol=1e-6)
  assert abs(float(official.mean.astype(np.float64).sum()) - 6.76233) < 1e-4
  assert abs(float(official.std.astype(np.float64).sum()) - 148.42415) < 1e-4
  assert int(np.argmin(official.std)) == 234 and abs(official.std.min() - 0.1629) < 1e-4
  assert int(np.argmax(official.std)) == 104 and abs(official.std.max() - 1.5530) < 1e-4
  assert official.mean.dtype == np.float32 and official.dim == 384
  # -1 is row 11; the fingerprint names the file's bytes and the row.
  assert official.fingerprint == f"sha256:{OFFICIAL_SHA256}:row11"
  row11 = ls.load_latent_stats(STATS_FILE, layer=11)
  assert row11.fingerprint == official.fingerprint
  np.testing.assert_array_equal(row11.mean, official.mean)
  row0 = ls.load_latent_stats(STATS_FILE, layer=0)
  assert row0.fingerprint.endswith(":row0") and row0.std.max() > 10  # layer 0 std up to 16.5


def test_reader_equals_torch_load(official, torch_stats):
  m, s = torch_stats
  np.testing.assert_array_equal(official.mean, m.numpy())
  np.testing.assert_array_equal(official.std, s.numpy())


def _features(seed=0, shape=(2, 384, 3, 5)):
  # Post-LayerNorm-like magnitudes around the statistics; NCHW as the official code has them.
  return torch.from_numpy(np.random.default_rng(seed).normal(0, 1.0, shape).astype(np.float32))


def _nhwc(t):
  return t.permute(0, 2, 3, 1).numpy()


def test_normalize_matches_torch_fp32_and_inverts(official, torch_stats):
  m, s = (t[None, :, None, None] for t in torch_stats)
  f = _features()
  want = (f - m) / (s + 1e-8)  # official expression, fp32 statistics
  got = np.asarray(ls.normalize_arrays(_nhwc(f), official.mean, official.std))
  np.testing.assert_array_equal(got, _nhwc(want))
  back = np.asarray(ls.denormalize_arrays(got, official.mean, official.std))
  np.testing.assert_array_equal(back, _nhwc(want * s + m))  # official sampling inverse
  np.testing.assert_allclose(back, _nhwc(f), rtol=0, atol=2e-6)


def test_bf16_statistics_match_torch(official, torch_stats):
  # Official training: stats `.to(torch.bfloat16)` once, then `(feats - mean) / (std + 1e-8)` on
  # fp32 features.
  m, s = (t[None, :, None, None].to(torch.bfloat16) for t in torch_stats)
  f = _features(seed=1)
  want = (f - m) / (s + 1e-8)
  assert want.dtype == torch.float32
  got = np.asarray(ls.normalize_arrays(_nhwc(f), official.mean, official.std, bf16_stats=True))
  np.testing.assert_array_equal(got, _nhwc(want))
  # Also bit-exact compiled, with the statistics as traced arguments (as the encoder runs it).
  jitted = jax.jit(ls.normalize_arrays, static_argnums=3)
  np.testing.assert_array_equal(
      np.asarray(jitted(_nhwc(f), official.mean, official.std, True)), _nhwc(want))
  # The rounding is visible: fp32 statistics give other numbers.
  fp32 = np.asarray(ls.normalize_arrays(_nhwc(f), official.mean, official.std))
  assert 1e-4 < np.abs(fp32 - got).max() < 0.05


def test_bf16_epsilon_is_added_in_bf16():
  # A tiny std where the epsilon matters: torch adds 1e-8 to a bf16 tensor in bf16.
  std = np.array([3e-8, 1e-6, 0.5], np.float32)
  f = np.ones((1, 3), np.float32)
  want = torch.ones(1, 3) / (torch.from_numpy(std).to(torch.bfloat16) + 1e-8)
  np.testing.assert_array_equal(
      np.asarray(ls.normalize_arrays(f, np.zeros(3, np.float32), std, bf16_stats=True)),
      want.numpy())


def test_save_compute_and_reload(tmp_path):
  rng = np.random.default_rng(3)
  latents = rng.normal([1.0, -2.0, 0.5], [0.5, 2.0, 0.1], size=(40, 4, 5, 3)).astype(np.float32)
  acc = ls.StatsAccumulator()
  for chunk in np.array_split(latents, 7):  # uneven batches
    acc.update(chunk)
  mean, std = acc.result()
  flat = latents.reshape(-1, 3).astype(np.float64)
  np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-6)
  np.testing.assert_allclose(std, flat.std(0), rtol=1e-6)
  path = tmp_path / "demo_stats.pt"
  ls.save_latent_stats(path, mean, std)
  # Same format as the official file: torch reads a dict of [1, C] float32 tensors.
  d = torch.load(path, weights_only=True)
  assert set(d) == {"mean", "std"} and d["mean"].shape == (1, 3) and d["std"].dtype == torch.float32
  stats = ls.load_latent_stats(path)
  np.testing.assert_array_equal(stats.mean, mean)
  np.testing.assert_array_equal(stats.std, std)
  assert stats.fingerprint == f"sha256:{ls.file_sha256(path)}:row0"
  again = ls.write_latent_stats(tmp_path / "again.pt", np.array_split(latents, 3))
  np.testing.assert_allclose(again.mean, mean, rtol=1e-6)
  np.testing.assert_allclose(again.std, std, rtol=1e-6)
  z = np.asarray(ls.normalize_arrays(latents, stats.mean, stats.std))
  zf = z.reshape(-1, 3)
  np.testing.assert_allclose(zf.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(zf.std(0), 1, atol=1e-5)


def test_from_arrays():
  a = ls.LatentStats.from_arrays(np.zeros(4), np.ones(4))
  same = ls.LatentStats.from_arrays(np.zeros(4, np.float32), np.ones(4, np.float32), "other")
  b = ls.LatentStats.from_arrays(np.zeros(4), np.full(4, 2.0))
  assert a.fingerprint == same.fingerprint != b.fingerprint  # the values, not the source
  with pytest.raises(ValueError, match="std values <= 0"):
    ls.LatentStats.from_arrays(np.zeros(2), np.array([1.0, 0.0]))
  with pytest.raises(ValueError, match="one shape"):
    ls.LatentStats.from_arrays(np.zeros(2), np.ones(3))


def test_bad_files_are_named(tmp_path):
  with pytest.raises(ValueError, match="stats_path"):
    ls.load_latent_stats("")
  with pytest.raises(FileNotFoundError):
    ls.load_latent_stats(tmp_path / "nope.pt")
  torch.save({"mean": torch.zeros(2, 3)}, tmp_path / "no_std.pt")
  # A file of the wrong content is the user's: InputError (one line in the scripts).
  with pytest.raises(InputError, match=r"missing \['std'\]"):
    ls.load_latent_stats(tmp_path / "no_std.pt")
  torch.save({"mean": torch.zeros(2, 3), "std": torch.ones(2, 4)}, tmp_path / "shapes.pt")
  with pytest.raises(InputError, match="differ in shape"):
    ls.load_latent_stats(tmp_path / "shapes.pt")
  torch.save({"mean": torch.zeros(2, 3), "std": torch.ones(2, 3)}, tmp_path / "ok.pt")
  with pytest.raises(InputError, match="stats_layer 2 is out of range for its 2 rows"):
    ls.load_latent_stats(tmp_path / "ok.pt", layer=2)
  torch.save({"mean": torch.zeros(3), "std": torch.ones(3)}, tmp_path / "flat.pt")
  with pytest.raises(InputError, match=r"\[layers, C\]"):
    ls.load_latent_stats(tmp_path / "flat.pt")
  torch.save({"mean": torch.zeros(2, 3), "std": torch.zeros(2, 3)}, tmp_path / "zero_std.pt")
  with pytest.raises(InputError, match=r"zero_std.pt row 1: 3 std values <= 0"):
    ls.load_latent_stats(tmp_path / "zero_std.pt", layer=-1)


def test_file_sha256_hashes_a_large_file_once_until_it_changes(tmp_path, monkeypatch):
  big = tmp_path / "weights.bin"
  data = np.random.default_rng(0).integers(0, 256, ls._MEMO_MIN_BYTES, dtype=np.uint8).tobytes()
  big.write_bytes(data)
  reads = []
  real = hashlib.sha256
  monkeypatch.setattr(ls.hashlib, "sha256", lambda *a: reads.append(1) or real(*a))
  assert ls.file_sha256(big) == real(data).hexdigest()
  assert ls.file_sha256(str(big)) == real(data).hexdigest() and len(reads) == 1
  changed = bytes([data[0] ^ 1]) + data[1:]
  big.write_bytes(changed)  # same size, later modification time
  st = os.stat(big)
  os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
  assert ls.file_sha256(big) == real(changed).hexdigest() and len(reads) == 2
  # A small file is read every time, even rewritten at the same size and modification time.
  small = tmp_path / "stats.pt"
  small.write_bytes(b"a" * 100)
  st = os.stat(small)
  assert ls.file_sha256(small) == real(b"a" * 100).hexdigest()
  small.write_bytes(b"b" * 100)
  os.utime(small, ns=(st.st_atime_ns, st.st_mtime_ns))
  assert ls.file_sha256(small) == real(b"b" * 100).hexdigest() and len(reads) == 4
