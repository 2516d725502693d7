"""launch/reconstruct.py and svg_jax/eval/reconstruction.py: chunks, names, reruns, interruption,
bad inputs. A stand-in autoencoder (identity or a fixed pixel change) makes the expected PSNR /
SSIM independent facts; the real tiny autoencoder runs in tests/test_autoencoder.py."""
import errno
import json
import os
import types

import numpy as np
import pytest
from PIL import Image

import script_runs
from svg_jax import autoencoder as ae_lib
from svg_jax.convert import decoder as dec_conv
from svg_jax.eval import reconstruction
from svg_jax.input_errors import InputError


class FakeAE:
  """`reconstruct` as the identity, or `x ^ 1` (PSNR 10 log10(255^2) = 48.13 dB exactly);
  records each call's batch size; `on_call(k)` runs before call k (from 0)."""

  def __init__(self, flip=False, on_call=None):
    self.encoder_cfg = types.SimpleNamespace(patch_size=16)
    self.flip, self.on_call, self.calls = flip, on_call, []

  def reconstruct(self, x):
    if self.on_call:
      self.on_call(len(self.calls))
    self.calls.append(len(x))
    return x ^ np.uint8(1) if self.flip else x.copy()


def _image(path, w=64, h=64, seed=0):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
  return str(path)


def _strict_json(path):
  def refuse(name):
    raise ValueError(f"{name} is not JSON")
  with open(path) as f:
    return json.load(f, parse_constant=refuse)


def test_buckets_go_in_bounded_chunks_written_as_each_finishes(tmp_path):
  paths = [_image(tmp_path / f"i{k:02d}.png", seed=k) for k in range(11)]
  out = str(tmp_path / "out")
  seen = []

  def check_written(k):  # before chunk k: every earlier chunk's PNGs and lines are there
    lines = open(os.path.join(out, reconstruction.LINES_FILE)).read().splitlines()
    seen.append((k, len(lines) - 1, sum(os.path.exists(os.path.join(out, f"i{j:02d}.png.png"))
                                        for j in range(11))))

  ae = FakeAE(flip=True, on_call=check_written)
  summary = reconstruction.reconstruct_images(ae, paths, 64, out, say=lambda s: None,
                                              batch_size=4)
  assert ae.calls == [4, 4, 3]
  assert seen == [(0, 0, 0), (1, 4, 4), (2, 8, 8)]
  assert [r["file"] for r in summary["images"]] == [f"i{k:02d}.png.png" for k in range(11)]
  for r in summary["images"]:
    assert r["psnr"] == pytest.approx(10 * np.log10(255.0 ** 2))


def test_names_keep_the_extension_and_folders(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  jpg = str(tmp_path / "a" / "good.jpg")
  Image.open(_image(tmp_path / "x.png", seed=1)).save(jpg, quality=70)
  png = _image(tmp_path / "a" / "good.png", seed=2)
  other = _image(tmp_path / "b" / "good.png", seed=3)
  out = tmp_path / "out"
  summary = reconstruction.reconstruct_images(FakeAE(), [jpg, png, other], 64, str(out),
                                              say=lambda s: None)
  files = {jpg: "good.jpg.png", png: os.path.join("a", "good.png.png"),
           other: os.path.join("b", "good.png.png")}
  assert {r["path"]: r["file"] for r in summary["images"]} == files
  for src in (jpg, png, other):
    pair = np.asarray(Image.open(out / files[src]))
    crop, _ = ae_lib.preprocess(src, 64)
    np.testing.assert_array_equal(pair[:, :64], crop)  # each output holds its own input


def test_a_perfect_reconstruction_is_strict_json_and_a_finite_mean(tmp_path):
  paths = [_image(tmp_path / f"{k}.png", seed=k) for k in range(2)]
  lines = []
  reconstruction.reconstruct_images(FakeAE(), paths, 64, str(tmp_path / "out"), say=lines.append)
  metrics = _strict_json(tmp_path / "out" / "metrics.json")
  assert [r["psnr"] for r in metrics["images"]] == [None, None]
  assert [r["ssim"] for r in metrics["images"]] == [pytest.approx(1.0)] * 2
  assert metrics["mean_psnr"] is None and metrics["identical"] == 2
  assert metrics["finished"] is True and metrics["settings"]["resolution"] == 64
  for line in open(tmp_path / "out" / "metrics.jsonl"):
    json.loads(line, parse_constant=lambda name: pytest.fail(name))
  assert "inf (identical)" in lines[0] and "2 identical" in lines[-1]


def test_tiny_images_are_skipped_with_the_reason(tmp_path):
  good = _image(tmp_path / "good.png")
  tiny = _image(tmp_path / "tiny.png", w=5, h=7)
  summary = reconstruction.reconstruct_images(FakeAE(), [good, tiny], 64,
                                              str(tmp_path / "out"), say=lambda s: None)
  assert [r["path"] for r in summary["images"]] == [good]
  assert summary["skipped"] == [{"path": tiny, "reason": "too small: 5x7, shorter side < 64"}]
  assert not (tmp_path / "out" / "tiny.png.png").exists()


def test_an_interrupted_run_keeps_its_finished_images_and_resumes(tmp_path, capsys):
  paths = [_image(tmp_path / f"{k}.png", seed=k) for k in range(5)]
  out = str(tmp_path / "out")

  def stop(k):
    if k == 1:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    reconstruction.reconstruct_images(FakeAE(on_call=stop), paths, 64, out, say=lambda s: None,
                                      batch_size=2)
  assert "stopped: 2 of 5 images are written" in capsys.readouterr().err
  metrics = _strict_json(os.path.join(out, "metrics.json"))
  assert metrics["finished"] is False and [r["file"] for r in metrics["images"]] == [
      "0.png.png", "1.png.png"]
  assert sorted(os.listdir(out)) == ["0.png.png", "1.png.png", "metrics.json", "metrics.jsonl"]
  with pytest.raises(InputError, match="holds an earlier run"):
    reconstruction.check_out_folder(out)
  ae = FakeAE()
  summary = reconstruction.reconstruct_images(ae, paths, 64, out, say=lambda s: None,
                                              batch_size=2, resume=True)
  assert ae.calls == [2, 1] and len(summary["images"]) == 5 and summary["finished"]
  with pytest.raises(InputError, match="other settings.*resolution"):
    reconstruction.reconstruct_images(ae, paths, 128, out, say=lambda s: None, resume=True)


def test_overwrite_removes_the_earlier_runs_files(tmp_path):
  out = tmp_path / "out"
  first = [_image(tmp_path / f"{k}.png", seed=k) for k in range(3)]
  reconstruction.reconstruct_images(FakeAE(), first, 64, str(out), say=lambda s: None)
  (out / "notes.txt").write_text("mine")
  reconstruction.check_out_folder(str(out), overwrite=True)
  reconstruction.reconstruct_images(FakeAE(), first[:1], 64, str(out), say=lambda s: None,
                                    settings={"decoder_path": "d.ckpt"})
  assert sorted(os.listdir(out)) == ["0.png.png", "metrics.json", "metrics.jsonl", "notes.txt"]
  assert _strict_json(out / "metrics.json")["settings"]["decoder_path"] == "d.ckpt"


def test_overwrite_removes_the_folders_it_emptied(tmp_path):
  out = tmp_path / "out"
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  twins = [_image(tmp_path / d / "x.png", seed=k) for k, d in enumerate("ab")]
  reconstruction.reconstruct_images(FakeAE(), twins, 64, str(out), say=lambda s: None)
  assert (out / "a" / "x.png.png").exists() and (out / "b" / "x.png.png").exists()
  (out / "b" / "mine.txt").write_text("kept")
  reconstruction.reconstruct_images(FakeAE(), twins[:1], 64, str(out), say=lambda s: None)
  assert sorted(os.listdir(out)) == ["b", "metrics.json", "metrics.jsonl", "x.png.png"]
  assert os.listdir(out / "b") == ["mine.txt"]


def test_a_refused_write_is_one_line_naming_the_file(tmp_path, monkeypatch):
  path = _image(tmp_path / "a.png")

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(reconstruction.atomic_files, "save_png", full)
  with pytest.raises(reconstruction.WriteFailed) as e:
    reconstruction.reconstruct_images(FakeAE(), [path], 64, str(tmp_path / "out"),
                                      say=lambda s: None)
  assert str(e.value).startswith(f"cannot write {tmp_path / 'out' / 'a.png.png'}: "
                                 f"{os.strerror(errno.ENOSPC)}")
  assert isinstance(e.value, InputError) and "\n" not in str(e.value)


@pytest.mark.parametrize("resolution, message", [
    (100, "--resolution 100 is not a multiple of the 16-pixel patches"),
    (250, "--resolution 250 is not a multiple of the 16-pixel patches"),
    (96, "--resolution 96 has no square bucket"),
])
def test_resolutions_that_distort_crops_are_refused(resolution, message):
  with pytest.raises(InputError, match=message):
    reconstruction.check_resolution(resolution, 16)


def test_check_resolution_takes_square_multiples():
  for resolution in (64, 256, 512):
    reconstruction.check_resolution(resolution, 16)


def test_image_lists_name_empty_entries_and_empty_folders(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "sub").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("x")
  (tmp_path / "other" / "sub" / "x.png").write_bytes(b"")
  for folder in ("empty", "other"):
    with pytest.raises(InputError, match=f"no image files found in {tmp_path / folder}"):
      ae_lib.list_images([str(tmp_path / folder)])
  with pytest.raises(InputError, match="empty entry"):
    ae_lib.list_images([str(tmp_path / "other" / "notes.txt"), ""])


def test_decoder_files_of_the_wrong_kind_are_input_errors(tmp_path):
  odd = tmp_path / "dec.weird"
  odd.write_bytes(b"x")
  with pytest.raises(InputError, match="unknown decoder checkpoint file type"):
    dec_conv._read_state(str(odd))
  with pytest.raises(InputError, match=f"{tmp_path} is a folder"):
    dec_conv._read_state(str(tmp_path))


def _autoencoder_config_file(folder):
  """A config file of the autoencoder section's defaults."""
  cfg = folder / "cfg.py"
  cfg.write_text("import ml_collections\nfrom svg_jax.config import autoencoder_defaults\n\n\n"
                 "def get_config():\n  c = ml_collections.ConfigDict()\n"
                 "  c.autoencoder = autoencoder_defaults()\n  return c\n")
  return cfg


def test_the_cli_checks_inputs_before_loading_anything(tmp_path):
  (tmp_path / "empty").mkdir()
  cfg = _autoencoder_config_file(tmp_path)
  missing = [f"--config={cfg}", f"--config.autoencoder.encoder_path={tmp_path / 'no.pth'}",
             f"--config.autoencoder.decoder_path={tmp_path / 'no.ckpt'}"]
  for args, message in (
      ([f"--images={tmp_path / 'empty'}"], f"input error: no image files found in "
                                           f"{tmp_path / 'empty'}"),
      ([f"--images={tmp_path / 'empty'},,x.png"], "input error: --images has an empty entry"),
      (["--images=x.png", "--resolution=100"], "input error: --resolution 100 is not a multiple"),
  ):
    out = tmp_path / "out"
    script_runs.assert_one_line(script_runs.run("reconstruct.py", *missing, *args, f"--out={out}"),
                                message)
    assert not out.exists()


def test_the_cli_refuses_a_resume_of_other_settings_before_loading_weights(tmp_path):
  """The weights here are no weights: only the settings check, which comes first, can answer."""
  (tmp_path / "enc.pth").write_bytes(b"not weights")
  (tmp_path / "dec.ckpt").write_bytes(b"not weights")
  out = tmp_path / "out"
  out.mkdir()
  (out / reconstruction.LINES_FILE).write_text(json.dumps(
      {"settings": {"resolution": 64, "min_side": 64, "decoder_path": "other.ckpt"}}) + "\n")
  image = _image(tmp_path / "a.png")
  run = script_runs.run("reconstruct.py", f"--config={_autoencoder_config_file(tmp_path)}",
                        f"--config.autoencoder.encoder_path={tmp_path / 'enc.pth'}",
                        f"--config.autoencoder.decoder_path={tmp_path / 'dec.ckpt'}",
                        f"--images={image}", "--resolution=64", f"--out={out}", "--resume")
  script_runs.assert_one_line(run, f"input error: --out {out} holds a run of other settings")
