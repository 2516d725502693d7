"""SVGAutoencoder: encode vs transformers, decode vs diffusers, sharding, files, metrics, the CLI.

References nobody here wrote: `transformers.DINOv3ViTModel` (the official DINOv3 function,
docs/equivalence/autoencoder.md §1) fed torchvision-style ImageNet-normalized pixels, followed by the
official normalization evaluated by torch; `diffusers`' `vae.Decoder` (the official decoder, docs/equivalence/autoencoder.md §2)
applied to latents denormalized by torch; skimage's PSNR / SSIM. Random weights and random
statistics everywhere, fp32. The random small models are built by the helpers of
tests/test_dinov3.py and tests/test_decoder.py (weights move only through svg_jax.convert).
"""
import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image

import script_runs
import test_decoder
import test_dinov3
from svg_jax import autoencoder as ae_lib
from svg_jax import config as config_lib
from svg_jax import latent_stats as ls
from svg_jax import parallel
from svg_jax.convert import decoder as dec_conv
from svg_jax.convert import dinov3 as enc_conv
from svg_jax.convert.torch_pickle import save_torch_file
from svg_jax.eval import image_metrics
from svg_jax.data import buckets

ATOL = 1e-4
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENC = test_dinov3.SMALL  # dim 64, 3 blocks, 2 registers
DEC = test_decoder.SMALL  # z_channels 16, 5 levels (16x)
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]


def _random_stats(dim, seed):
  rng = np.random.default_rng(seed)
  return ls.LatentStats.from_arrays(rng.normal(0, 0.5, dim), rng.uniform(0.3, 2.0, dim))


def _torch_stats(stats, bf16=False):
  m, s = (torch.from_numpy(a.copy())[None, :, None, None] for a in (stats.mean, stats.std))
  return (m.to(torch.bfloat16), s.to(torch.bfloat16)) if bf16 else (m, s)


@pytest.fixture(scope="module")
def encoder():
  model = test_dinov3._random_hf(test_dinov3.SMALL_HF, seed=11)
  params = enc_conv.hf_to_params(test_dinov3._hf_state(model), ENC)
  return model, params, _random_stats(ENC.dim, 1)


@pytest.fixture(scope="module")
def decoder():
  model = test_decoder._torch_decoder(DEC, seed=3)
  state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
  return model, dec_conv.diffusers_to_params(state, DEC), _random_stats(DEC.z_channels, 2)


def _uint8_images(b, h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3), dtype=np.uint8)


def _reference_encode(model, images_u8, stats, bf16=False):
  """Official pipeline in torch: ToTensor, Normalize, DINOv3 patch tokens, (f - m) / (s + 1e-8)."""
  x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div(255)
  x = (x - IMAGENET_MEAN) / IMAGENET_STD
  b, _, h, w = x.shape
  gh, gw = h // ENC.patch_size, w // ENC.patch_size
  with torch.no_grad():
    tokens = model(pixel_values=x).last_hidden_state[:, ENC.num_prefix_tokens:]
  f = tokens.permute(0, 2, 1).reshape(b, ENC.dim, gh, gw)  # official [B, C, H/16, W/16]
  m, s = _torch_stats(stats, bf16)
  return ((f - m) / (s + 1e-8)).permute(0, 2, 3, 1).numpy()


def _reference_decode(model, z_nhwc, stats):
  m, s = _torch_stats(stats)
  f = torch.from_numpy(z_nhwc).permute(0, 3, 1, 2) * s + m
  with torch.no_grad():
    return model(f.contiguous()).permute(0, 2, 3, 1).numpy()


def _identity_stats(dim):
  """mean 0, std 1: (f - 0) / (1 + 1e-8) is f exactly in fp32 (raw features)."""
  return ls.LatentStats.from_arrays(np.zeros(dim, np.float32), np.ones(dim, np.float32))


def _err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_encode_matches_transformers(encoder):
  model, params, stats = encoder
  images = _uint8_images(3, 48, 80)  # non-square: 3 x 5 patches
  for bf16 in (False, True):
    ae = ae_lib.SVGAutoencoder(stats=stats, encoder_params=params, encoder_cfg=ENC,
                               bf16_stats=bf16)
    got = ae.encode(images)
    want = _reference_encode(model, images, stats, bf16)
    assert got.shape == (3, 3, 5, ENC.dim) and got.dtype == np.float32
    err = _err(got, want)
    print(f"encode vs transformers (bf16 stats {bf16}): max abs err {err:.2e}")
    assert err <= ATOL
  # Float images in [0, 1] are the same input as uint8 / 255.
  np.testing.assert_allclose(ae.encode(images.astype(np.float32) / 255), got, atol=1e-5)
  # The statistics really are applied: raw features differ from the latents by far more.
  raw = _reference_encode(model, images, _identity_stats(ENC.dim))
  assert _err(raw, got) > 0.5


def test_decode_matches_diffusers(decoder):
  model, params, stats = decoder
  ae = ae_lib.SVGAutoencoder(stats=stats, decoder_params=params, decoder_cfg=DEC)
  z = np.random.default_rng(4).standard_normal((2, 3, 4, DEC.z_channels)).astype(np.float32)
  got = ae.decode(z)
  want = _reference_decode(model, z, stats)
  assert got.shape == (2, 48, 64, 3)
  err = _err(got, want)
  print(f"decode vs diffusers: max abs err {err:.2e} (max |out| {np.abs(want).max():.2f})")
  assert err <= ATOL
  # Decoding without denormalizing is far off: the statistics matter.
  plain = ae_lib.SVGAutoencoder(stats=_identity_stats(DEC.z_channels),
                                decoder_params=params, decoder_cfg=DEC)
  assert _err(plain.decode(z), want) > 0.1


def test_sharded_and_chunked_runs_give_the_same_numbers(encoder, decoder):
  assert jax.device_count() == 8
  _, enc_params, enc_stats = encoder
  _, dec_params, dec_stats = decoder
  images = _uint8_images(5, 32, 48, seed=5)  # 5 images: padded to the 8-way batch split
  z = np.random.default_rng(6).standard_normal((5, 2, 3, DEC.z_channels)).astype(np.float32)
  single_enc = ae_lib.SVGAutoencoder(stats=enc_stats, encoder_params=enc_params, encoder_cfg=ENC)
  single_dec = ae_lib.SVGAutoencoder(stats=dec_stats, decoder_params=dec_params, decoder_cfg=DEC)
  want_z, want_x = single_enc.encode(images), single_dec.decode(z)

  mesh = parallel.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  sharding = parallel.batch_sharding(mesh, 4)
  enc = ae_lib.SVGAutoencoder(stats=enc_stats, encoder_params=enc_params, encoder_cfg=ENC,
                              sharding=sharding)
  dec = ae_lib.SVGAutoencoder(stats=dec_stats, decoder_params=dec_params, decoder_cfg=DEC,
                              mesh=mesh)  # the batch sharding is derived from the mesh
  err_enc, err_dec = _err(enc.encode(images), want_z), _err(dec.decode(z), want_x)
  print(f"8-device mesh vs one device: encode {err_enc:.2e}, decode {err_dec:.2e}")
  assert err_enc <= 1e-5 and err_dec <= 1e-5
  # The compiled step really splits the batch over the 8 devices.
  x8 = jax.device_put(np.concatenate([images, images[:3]]), sharding)
  out = enc._encode(enc.encoder_params, enc._mean, enc._std, x8)
  assert out.sharding.is_equivalent_to(sharding, 4)
  assert dec.sharding == sharding
  assert len({s.device for s in out.addressable_shards}) == 8
  assert {s.data.shape[0] for s in out.addressable_shards} == {1}

  # Fixed-size chunks (the last one padded) give the same numbers too, with one compile.
  chunked = ae_lib.SVGAutoencoder(stats=enc_stats, encoder_params=enc_params, encoder_cfg=ENC,
                                  batch_size=2)
  # Autoencoders with the same configs share one jitted function (and its executables).
  assert chunked._encode is single_enc._encode
  compiled = chunked._encode._cache_size()
  assert _err(chunked.encode(images), want_z) <= 1e-5
  assert chunked._encode._cache_size() == compiled + 1  # the chunk shape [2, 32, 48, 3]
  chunked.encode(images[:2])
  chunked.encode(images[:1])  # padded to the chunk size
  assert chunked._encode._cache_size() == compiled + 1  # same shape: no new compile
  chunked.encode(_uint8_images(1, 48, 32))
  assert chunked._encode._cache_size() == compiled + 2  # a new image shape: one more


def test_bad_inputs_are_named(encoder, decoder):
  _, enc_params, enc_stats = encoder
  _, dec_params, dec_stats = decoder
  enc = ae_lib.SVGAutoencoder(stats=enc_stats, encoder_params=enc_params, encoder_cfg=ENC)
  with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
    enc.encode(_uint8_images(1, 40, 48))
  with pytest.raises(ValueError, match=r"images \[B, H, W, 3\]"):
    enc.encode(np.zeros((2, 32, 32), np.uint8))
  with pytest.raises(ValueError, match="no decoder"):
    enc.decode(np.zeros((1, 2, 2, ENC.dim), np.float32))
  with pytest.raises(ValueError, match="z_channels 16 != statistics size 64"):
    ae_lib.SVGAutoencoder(stats=enc_stats, decoder_params=dec_params, decoder_cfg=DEC)
  dec = ae_lib.SVGAutoencoder(stats=dec_stats, decoder_params=dec_params, decoder_cfg=DEC)
  with pytest.raises(ValueError, match=r"latents \[B, h, w, 16\]"):
    dec.decode(np.zeros((1, 2, 2, 64), np.float32))


def test_to_uint8():
  x = np.array([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 2.0], np.float32)
  # (x + 1) / 2 * 255 = -, 0, 0.1275, 127.5, 191.25, 255, - -> clamp, round half up.
  np.testing.assert_array_equal(ae_lib.to_uint8(x), [0, 0, 0, 128, 191, 255, 255])
  # As torchvision's save_image: mul(255).add(0.5).clamp(0, 255).to(uint8).
  r = np.random.default_rng(0).uniform(-1.2, 1.2, 1000).astype(np.float32)
  t = ((torch.from_numpy(r) + 1) / 2).clamp(0, 1).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
  np.testing.assert_array_equal(ae_lib.to_uint8(r), t.numpy())
  # As the official samplers: (x + 1) / 2, clamp_(0, 1), then torchvision's to_pil_image or
  # svg_generate.py's own mul(255).byte().
  t = ((torch.from_numpy(r) + 1) / 2).clamp(0, 1).mul(255).byte()
  np.testing.assert_array_equal(ae_lib.to_uint8(r, truncate=True), t.numpy())
  assert (ae_lib.to_uint8(r, truncate=True) != ae_lib.to_uint8(r)).mean() > 0.3


def test_preprocess_real_images():
  hello, man = os.path.join(ASSETS, "hello.png"), os.path.join(ASSETS, "man.jpg")
  # man.jpg 776x810 (aspect 0.96) -> 256x256; hello.png 1920x1401 RGBA (1.37) -> 320x192, whose
  # score min/max(320/1920, 192/1401) = 0.822 beats 256x256 (0.730) and 336x192 (0.783).
  crop, bucket = ae_lib.preprocess(man, 256)
  assert bucket == (256, 256) and crop.shape == (256, 256, 3) and crop.dtype == np.uint8
  crop_h, bucket_h = ae_lib.preprocess(hello, 256)
  assert bucket_h == (320, 192) and crop_h.shape == (192, 320, 3)
  assert bucket_h in buckets.buckets_for_resolution(256)
  # hello.png is RGBA, fully opaque: compositing on white leaves its RGB channels.
  rgba = Image.open(hello)
  assert rgba.mode == "RGBA" and np.asarray(rgba)[..., 3].min() == 255
  np.testing.assert_array_equal(ae_lib.preprocess(rgba.convert("RGB"), 256)[0], crop_h)
  # The same image given as a PIL image or an array crops identically.
  img = Image.open(man).convert("RGB")
  np.testing.assert_array_equal(ae_lib.preprocess(img, 256)[0], crop)
  np.testing.assert_array_equal(ae_lib.preprocess(np.asarray(img), 256)[0], crop)
  with pytest.raises(ValueError, match="mode RGBA"):
    ae_lib.preprocess(Image.open(hello), 256)


def test_psnr_and_ssim_match_skimage():
  from skimage.metrics import peak_signal_noise_ratio, structural_similarity

  rng = np.random.default_rng(7)
  for shape in [(32, 48, 3), (11, 20), (64, 40, 3)]:
    a = rng.integers(0, 256, shape).astype(np.uint8)
    noise = rng.normal(0, 20, shape)
    b = np.clip(a + noise + 10, 0, 255).astype(np.uint8)
    want_ssim = structural_similarity(a, b, data_range=255, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False,
                                      channel_axis=-1 if len(shape) == 3 else None)
    assert abs(image_metrics.ssim(a, b) - want_ssim) < 1e-10, shape
    assert abs(image_metrics.psnr(a, b) - peak_signal_noise_ratio(a, b, data_range=255)) < 1e-10
  # Smooth images (high SSIM) too, where the variance terms are small.
  yy, xx = np.mgrid[0:40, 0:56]
  a = np.stack([yy * 4, xx * 3, (xx + yy) * 2], -1).astype(np.uint8)
  b = np.clip(a.astype(int) + rng.integers(-2, 3, a.shape), 0, 255).astype(np.uint8)
  want = structural_similarity(a, b, data_range=255, gaussian_weights=True, sigma=1.5,
                               use_sample_covariance=False, channel_axis=-1)
  assert abs(image_metrics.ssim(a, b) - want) < 1e-10 and want > 0.9


def test_psnr_and_ssim_hand_cases():
  rng = np.random.default_rng(8)
  a = rng.integers(0, 256, (24, 30, 3)).astype(np.uint8)
  assert image_metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
  assert image_metrics.psnr(a, a) == float("inf")
  # Constant images p and q: variances are 0, so SSIM = (2pq + C1) / (p^2 + q^2 + C1).
  c1 = (0.01 * 255) ** 2
  for p, q in [(100, 110), (0, 255), (50, 50)]:
    x, y = np.full((16, 16), p, np.uint8), np.full((16, 16), q, np.uint8)
    assert image_metrics.ssim(x, y) == pytest.approx((2 * p * q + c1) / (p * p + q * q + c1), rel=1e-12)
  # A constant shift of 5 everywhere: MSE 25.
  assert image_metrics.psnr(np.zeros((8, 8)), np.full((8, 8), 5.0)) == pytest.approx(
      10 * np.log10(255 ** 2 / 25), rel=1e-12)
  with pytest.raises(ValueError, match="at least 11x11"):
    image_metrics.ssim(np.zeros((10, 30)), np.zeros((10, 30)))
  with pytest.raises(ValueError, match="differ in shape"):
    image_metrics.psnr(np.zeros((8, 8)), np.zeros((8, 9)))


# ----------------------------------------------------------------------------------------------
# Files: the real formats, from_config, and the reconstruct CLI


DEC64 = dataclasses.replace(DEC, z_channels=ENC.dim)


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory, encoder):
  """Tiny random encoder / decoder / statistics written in the official formats."""
  root = tmp_path_factory.mktemp("ae_files")
  _, enc_params, _ = encoder
  enc_path = str(root / "dinov3_tiny.pth")
  save_torch_file(enc_path, enc_conv.params_to_official(enc_params, ENC))
  dec_state = test_decoder._torch_decoder(DEC64, seed=5).state_dict()
  dec_params = dec_conv.diffusers_to_params({k: v.numpy() for k, v in dec_state.items()}, DEC64)
  dec_path = str(root / "svg_autoencoder_tiny.ckpt")  # Lightning layout: state_dict / decoder.*
  save_torch_file(dec_path, {"state_dict": dec_conv.params_to_official(dec_params, DEC64)})
  stats_path = str(root / "stats.pt")
  rng = np.random.default_rng(9)
  ls.save_latent_stats(stats_path, rng.normal(0, 0.3, ENC.dim), rng.uniform(0.5, 1.5, ENC.dim))
  cfg = config_lib.autoencoder_defaults()
  cfg.encoder.update({**dataclasses.asdict(ENC)})
  cfg.decoder.update({**dataclasses.asdict(DEC64)})
  cfg.encoder_path, cfg.decoder_path, cfg.stats_path = enc_path, dec_path, stats_path
  cfg.bf16_stats = False  # the default rounds them (the official statistics' training); not here
  return root, cfg, enc_params, dec_params


def test_from_config_loads_the_official_formats(weight_files, encoder):
  _, cfg, enc_params, dec_params = weight_files
  ae = ae_lib.SVGAutoencoder.from_config(cfg)
  stats = ls.load_latent_stats(cfg.stats_path)
  direct = ae_lib.SVGAutoencoder(stats=stats, encoder_params=enc_params, encoder_cfg=ENC,
                                 decoder_params=dec_params, decoder_cfg=DEC64)
  images = _uint8_images(2, 32, 32, seed=10)
  np.testing.assert_array_equal(ae.encode(images), direct.encode(images))
  z = ae.encode(images)
  np.testing.assert_array_equal(ae.decode(z), direct.decode(z))
  assert ae.fingerprints == {
      "encoder": "sha256:" + ls.file_sha256(cfg.encoder_path),
      "statistics": f"sha256:{ls.file_sha256(cfg.stats_path)}:row0"}
  bf16 = ml_collections.ConfigDict(cfg.to_dict())
  bf16.bf16_stats = True
  assert ae_lib.SVGAutoencoder.from_config(bf16, decoder=False).fingerprints["statistics"] == (
      ae.fingerprints["statistics"] + ":bf16")
  # Encoder only (e.g. precompute) and decoder only (sampling).
  assert ae_lib.SVGAutoencoder.from_config(cfg, decoder=False).decoder_params is None
  only_dec = ae_lib.SVGAutoencoder.from_config(cfg, encoder=False)
  assert only_dec.encoder_params is None and "encoder" not in only_dec.fingerprints
  # A config that wraps the section (config.autoencoder) works the same way.
  wrapped = ml_collections.ConfigDict({"autoencoder": cfg.to_dict()})
  assert ae_lib.SVGAutoencoder.from_config(wrapped, decoder=False).stats.dim == ENC.dim
  bare = config_lib.autoencoder_defaults()
  with pytest.raises(ValueError, match="autoencoder.encoder_path and autoencoder.decoder_path"):
    ae_lib.SVGAutoencoder.from_config(bare)
  bare.encoder_path = cfg.encoder_path  # the default statistics are the official 384 channels
  with pytest.raises(ValueError, match=f"{ENC.dim}.*384|384.*{ENC.dim}"):
    ae_lib.SVGAutoencoder.from_config(bare, decoder=False)
  # Statistics of another size: the message names the config fields and the file.
  other = ml_collections.ConfigDict(cfg.to_dict())
  other.stats_path = os.path.join(os.path.dirname(cfg.stats_path), "stats32.pt")
  ls.save_latent_stats(other.stats_path, np.zeros(32), np.ones(32))
  with pytest.raises(ValueError, match=re.escape(
      f"autoencoder.stats_path {other.stats_path} holds statistics of 32 channels, but "
      f"autoencoder.encoder.dim {ENC.dim} and autoencoder.decoder.z_channels")):
    ae_lib.SVGAutoencoder.from_config(other)
  bare.stats_path = ""
  with pytest.raises(ValueError, match="stats_path"):
    ae_lib.SVGAutoencoder.from_config(bare, decoder=False)


def test_from_config_takes_the_callers_fingerprints_instead_of_hashing_again(weight_files,
                                                                            monkeypatch):
  _, cfg, _, _ = weight_files
  known = ae_lib.config_fingerprints(cfg)
  hashed = []
  real = ls.file_sha256
  monkeypatch.setattr(ls, "file_sha256", lambda path: hashed.append(path) or real(path))
  ae = ae_lib.SVGAutoencoder.from_config(cfg, decoder=False, fingerprints=known)
  assert ae.fingerprints == known and cfg.encoder_path not in hashed
  # Without them the file is hashed, to the same fingerprint.
  assert ae_lib.SVGAutoencoder.from_config(cfg, decoder=False).fingerprints == known
  assert cfg.encoder_path in hashed


@pytest.mark.slow
def test_reconstruct_cli_end_to_end(weight_files, tmp_path):
  root, cfg, _, _ = weight_files
  config_file = tmp_path / "ae_config.py"
  config_file.write_text(
      "import ml_collections\n"
      "from svg_jax.config import autoencoder_defaults\n\n\n"
      "def get_config():\n"
      "  c = ml_collections.ConfigDict()\n"
      "  c.autoencoder = autoencoder_defaults()\n"
      f"  c.autoencoder.encoder.update({dataclasses.asdict(ENC)!r})\n"
      f"  c.autoencoder.decoder.update({dataclasses.asdict(DEC64)!r})\n"
      "  return c\n")
  bad = tmp_path / "broken.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
  out = tmp_path / "out"
  env = dict(os.environ, XLA_FLAGS=script_runs.xla_flags(), JAX_PLATFORMS="cpu")
  cmd = [sys.executable, os.path.join(REPO, "launch", "reconstruct.py"),
         f"--config={config_file}",
         f"--config.autoencoder.encoder_path={cfg.encoder_path}",
         f"--config.autoencoder.decoder_path={cfg.decoder_path}",
         f"--config.autoencoder.stats_path={cfg.stats_path}",
         f"--images={ASSETS}/hello.png,{ASSETS}/man.jpg,{bad}", f"--out={out}",
         "--resolution=256"]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  print(proc.stdout)
  lines = proc.stdout.splitlines()
  assert any(l.startswith(f"skipped {bad}") for l in lines)
  metrics = json.loads((out / "metrics.json").read_text())
  assert [s["path"] for s in metrics["skipped"]] == [str(bad)]
  by_name = {m["file"]: m for m in metrics["images"]}
  assert set(by_name) == {"hello.png.png", "man.jpg.png"}
  assert by_name["hello.png.png"]["bucket"] == [320, 192]
  assert by_name["man.jpg.png"]["bucket"] == [256, 256]
  ae = ae_lib.SVGAutoencoder.from_config(cfg)
  for name, path in (("hello.png.png", f"{ASSETS}/hello.png"),
                     ("man.jpg.png", f"{ASSETS}/man.jpg")):
    pair = np.asarray(Image.open(out / name))
    w, h = by_name[name]["bucket"]
    assert pair.shape == (h, 2 * w, 3)
    orig, rec = pair[:, :w], pair[:, w:]
    crop, _ = ae_lib.preprocess(path, 256)
    np.testing.assert_array_equal(orig, crop)
    # The right half is this autoencoder's reconstruction of the crop (PNG is lossless).
    assert np.abs(rec.astype(int) - ae.reconstruct(crop[None])[0].astype(int)).max() <= 1
    assert by_name[name]["psnr"] == pytest.approx(image_metrics.psnr(orig, rec), rel=1e-9)
    assert by_name[name]["ssim"] == pytest.approx(image_metrics.ssim(orig, rec), rel=1e-9)
    assert any(l.startswith(path) and f"PSNR {by_name[name]['psnr']:.2f} dB" in l for l in lines)
  mean_psnr = np.mean([m["psnr"] for m in metrics["images"]])
  assert metrics["mean_psnr"] == pytest.approx(mean_psnr)
  assert any(l.startswith("mean over 2 images") and f"PSNR {mean_psnr:.2f} dB" in l
             for l in lines)
  # Resolutions that give no crop, or crops SSIM cannot score: one line before anything loads.
  patch8 = "--config.autoencoder.encoder.patch_size=8"
  for resolution, extra, message in (
      ("0", [], "--resolution 0 gives no crop of whole 16-pixel patches"),
      ("-64", [], "--resolution -64 gives no crop"), ("8", [], "--resolution 8 gives no crop"),
      ("16", [patch8], "--resolution 16: its narrowest crops are 8 px, SSIM needs at least 11")):
    bad_run = subprocess.run([a for a in cmd if not a.startswith("--resolution")] + extra
                             + [f"--resolution={resolution}", f"--out={tmp_path / 'no'}"],
                             capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert bad_run.returncode == 2 and message in bad_run.stderr, bad_run.stderr[-2000:]
    assert not (tmp_path / "no").exists()
