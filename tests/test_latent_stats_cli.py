"""Statistics of an encoder over image files: `latent_stats_job.make_stats_file` and
launch/latent_stats.py.

The reference nobody here wrote: `transformers.DINOv3ViTModel` (random tiny weights, saved in the
official .pth format that the script loads) on the same crops, ImageNet-normalized by torch, with
numpy's float64 mean / std over every patch token of every image; the file is read back by torch.
"""
import dataclasses
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

import script_runs
import test_dinov3
from svg_jax import autoencoder as ae_lib
from svg_jax import config as config_lib
from svg_jax import latent_stats as ls
from svg_jax import latent_stats_job
from svg_jax.convert import dinov3 as enc_conv
from svg_jax.convert.torch_pickle import save_torch_file
from svg_jax.input_errors import InputError

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
ENC = test_dinov3.SMALL  # dim 64, 3 blocks, 2 registers, 16-pixel patches
RESOLUTION = 128  # 9 buckets: the images below fall into several
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """(HF model, config, image folder, good image paths, the bad image's path)."""
  root = tmp_path_factory.mktemp("stats_cli")
  model = test_dinov3._random_hf(test_dinov3.SMALL_HF, seed=21)
  enc_path = str(root / "dinov3_tiny.pth")
  params = enc_conv.hf_to_params(test_dinov3._hf_state(model), ENC)
  save_torch_file(enc_path, enc_conv.params_to_official(params, ENC))
  config = config_lib.precompute_job_config()
  config.autoencoder.encoder.update(dataclasses.asdict(ENC))
  config.autoencoder.encoder_path = enc_path
  images = root / "images"
  images.mkdir()
  rng = np.random.default_rng(4)
  for name, (h, w) in {"a_wide": (90, 200), "b_tall": (150, 70), "c_square": (100, 100),
                       "d_wide": (80, 170)}.items():
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{name}.png")
  for name in ("hello.png", "man.jpg"):
    (images / name).write_bytes(open(os.path.join(ASSETS, name), "rb").read())
  bad = images / "broken.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
  good = sorted(str(p) for p in images.iterdir() if p.name != "broken.png")
  return model, config, str(images), good, str(bad)


def _reference(model, paths):
  """(mean, std) float64 [C] of the HF model's patch tokens over the crops of `paths`."""
  tokens = []
  for path in paths:
    crop, _ = ae_lib.preprocess(path, RESOLUTION, ENC.patch_size)
    x = torch.from_numpy(crop[None].copy()).permute(0, 3, 1, 2).float().div(255)
    with torch.no_grad():
      out = model(pixel_values=(x - IMAGENET_MEAN) / IMAGENET_STD).last_hidden_state
    tokens.append(out[0, ENC.num_prefix_tokens:].numpy().astype(np.float64))
  flat = np.concatenate(tokens)
  return flat.mean(0), flat.std(0)


def _make(config, images, out, **kw):
  said = []
  kw.setdefault("resolution", RESOLUTION)
  result = latent_stats_job.make_stats_file(config, images, str(out), say=said.append,
                                            stream=io.StringIO(), **kw)
  return result, said


def test_statistics_equal_the_reference_and_bad_images_are_reported(setup, tmp_path):
  model, config, folder, good, bad = setup
  out = tmp_path / "stats.pt"
  # Batches of 2 over 3+ buckets: full batches of the fullest bucket, then the rest.
  result, said = _make(config, [folder], out, batch_size=2)
  assert sorted(result.used) == good
  assert [p for p, _ in result.skipped] == [bad]
  assert said[0] == f"skipped {bad}: {result.skipped[0][1]}"
  assert said[-1].startswith(f"statistics of {len(good)} images (") and (
      said[-1].endswith(f"1 skipped, written to {out}"))
  d = torch.load(out, weights_only=True)  # the official format: float32 [1, C]
  assert set(d) == {"mean", "std"} and d["mean"].shape == (1, ENC.dim)
  assert d["std"].dtype == torch.float32
  mean, std = _reference(model, good)
  np.testing.assert_allclose(d["mean"][0].numpy(), mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(d["std"][0].numpy(), std, rtol=1e-4, atol=1e-5)
  stats = ls.load_latent_stats(out, int(config.autoencoder.stats_layer))  # as a config reads it
  np.testing.assert_array_equal(stats.mean, d["mean"][0].numpy())
  # The batching changes nothing but rounding.
  again, _ = _make(config, [folder], tmp_path / "one_batch.pt", batch_size=64)
  for a, b in zip(again.accumulator.result(), result.accumulator.result()):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_existing_output_limit_and_bad_input(setup, tmp_path):
  model, config, folder, good, bad = setup
  out = tmp_path / "stats.pt"
  out.write_bytes(b"keep me")
  with pytest.raises(InputError, match="exists; pass --overwrite"):
    _make(config, [folder], out)
  assert out.read_bytes() == b"keep me"
  listed = ae_lib.list_images([folder])
  result, _ = _make(config, [folder], out, limit=3, overwrite=True)
  assert sorted(result.used + [p for p, _ in result.skipped]) == sorted(listed[:3])
  mean, std = _reference(model, [p for p in listed[:3] if p != bad])
  stats = ls.load_latent_stats(out)
  np.testing.assert_allclose(stats.mean, mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats.std, std, rtol=1e-4, atol=1e-5)
  for kw, message in (({"batch_size": 0}, "--batch_size must be >= 1"),
                      ({"limit": -1}, "--limit must be >= 0"),
                      ({"resolution": 8}, "--resolution 8 gives no crop")):
    with pytest.raises(InputError, match=message):
      _make(config, [folder], tmp_path / "x.pt", **kw)
  with pytest.raises(InputError, match="is a folder"):
    _make(config, [folder], tmp_path)
  with pytest.raises(InputError, match=f"no image could be encoded .*{bad}"):
    _make(config, [bad], tmp_path / "none.pt")
  assert not (tmp_path / "none.pt").exists()
  # A sliver is skipped as precompute skips it (precompute.min_side), not blown up into the
  # statistics.
  sliver = tmp_path / "sliver.png"
  Image.fromarray(np.full((30, 200, 3), 128, np.uint8)).save(sliver)
  result, said = _make(config, [str(sliver), good[0]], tmp_path / "sliver.pt")
  assert result.used == [good[0]]
  assert said[0] == f"skipped {sliver}: too small: 200x30, shorter side < 64"


@pytest.mark.slow
def test_cli_end_to_end(setup, tmp_path):
  _, config, folder, good, bad = setup
  config_file = tmp_path / "enc_config.py"
  config_file.write_text(
      "import ml_collections\n"
      "from svg_jax.config import autoencoder_defaults\n\n\n"
      "def get_config():\n"
      "  c = ml_collections.ConfigDict()\n"
      "  c.autoencoder = autoencoder_defaults()\n"
      f"  c.autoencoder.encoder.update({dataclasses.asdict(ENC)!r})\n"
      "  return c\n")
  out = tmp_path / "cli_stats.pt"
  proc = script_runs.run(
      "latent_stats.py", f"--config={config_file}",
      f"--config.autoencoder.encoder_path={config.autoencoder.encoder_path}",
      f"--images={folder}", f"--out={out}", f"--resolution={RESOLUTION}", "--batch_size=3",
      "--limit=4", devices=2)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  listed = ae_lib.list_images([folder])[:4]
  assert bad in listed and f"skipped {bad}: " in lines[0]
  assert lines[-1] == next(l for l in lines if l.startswith("statistics of 3 images ("))
  assert lines[-1].endswith(f"1 skipped, written to {out}")
  assert "ETA" in proc.stderr  # the progress line
  want, _ = _make(config, [folder], tmp_path / "in_process.pt", limit=4)
  stats = ls.load_latent_stats(out)
  np.testing.assert_allclose(stats.mean, want.accumulator.result()[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats.std, want.accumulator.result()[1], rtol=1e-5, atol=1e-6)
