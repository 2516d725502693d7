"""Image decoding (every odd and bad kind of file, made with PIL) and the pixel normalizations."""
import io
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from svg_jax.data import images
from svg_jax.data.images import BadImageError, open_rgb

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


def load_rgb(src, **kw):
  """`open_rgb` as the uint8 array [H, W, 3] the pipelines make of it."""
  image, info = open_rgb(src, **kw)
  arr = np.asarray(image)
  assert arr.dtype == np.uint8 and arr.shape == (info.height, info.width, 3)
  return arr, info


def _save(img, tmp_path, name, **kw):
  path = tmp_path / name
  img.save(path, **kw)
  return path


def _png_bytes(img):
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def test_real_assets_load():
  arr, info = load_rgb(f"{ASSETS}/hello.png")
  assert arr.dtype == np.uint8 and arr.shape == (1401, 1920, 3)
  assert (info.format, info.mode, info.conversion) == ("PNG", "RGBA", "alpha_on_white")
  arr, info = load_rgb(f"{ASSETS}/man.jpg")
  assert arr.shape == (810, 776, 3) and (info.format, info.conversion) == ("JPEG", "none")
  with open(f"{ASSETS}/man.jpg", "rb") as f:
    from_bytes, _ = load_rgb(f.read())
  np.testing.assert_array_equal(from_bytes, arr)


def test_rgba_composited_on_white(tmp_path):
  rgba = np.zeros((2, 3, 4), np.uint8)
  rgba[0, 0] = (200, 100, 50, 255)  # opaque
  rgba[0, 1] = (200, 100, 50, 0)  # fully transparent -> white
  rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black -> mid gray
  rgba[1] = (10, 20, 30, 64)
  arr, info = load_rgb(_save(Image.fromarray(rgba, "RGBA"), tmp_path, "a.png"))
  assert info.conversion == "alpha_on_white"
  assert tuple(arr[0, 0]) == (200, 100, 50)
  assert tuple(arr[0, 1]) == (255, 255, 255)
  assert np.abs(arr[0, 2].astype(int) - 127).max() <= 1
  # c * a + 255 * (1 - a), a = 64 / 255, within rounding.
  expect = np.array([10, 20, 30]) * 64 / 255 + 255 * (1 - 64 / 255)
  assert np.abs(arr[1, 0] - expect).max() <= 1


def test_la_and_palette(tmp_path):
  la = Image.fromarray(np.dstack([np.full((2, 2), 40, np.uint8),
                                  np.array([[255, 0], [255, 0]], np.uint8)]), "LA")
  arr, info = load_rgb(_save(la, tmp_path, "la.png"))
  assert info.conversion == "alpha_on_white"
  assert arr[:, 0].tolist() == [[40, 40, 40]] * 2 and arr[:, 1].tolist() == [[255, 255, 255]] * 2

  pal = Image.new("P", (3, 1))
  pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 0] + [0] * 759)
  pal.putdata([0, 1, 2])
  arr, info = load_rgb(_save(pal, tmp_path, "p.png"))
  assert (info.mode, info.conversion) == ("P", "palette")
  assert arr[0].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 0]]
  # Index 2 (black) transparent: composited on white, not shown as its palette colour.
  arr, info = load_rgb(_save(pal, tmp_path, "pt.png", transparency=2))
  assert info.conversion == "palette_alpha_on_white"
  assert arr[0].tolist() == [[255, 0, 0], [0, 255, 0], [255, 255, 255]]
  arr, info = load_rgb(_save(pal, tmp_path, "pt.gif", transparency=2))
  assert info.format == "GIF" and arr[0, 2].tolist() == [255, 255, 255]


def test_gray_bilevel_cmyk(tmp_path):
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
  arr, info = load_rgb(_save(Image.fromarray(gray, "L"), tmp_path, "l.png"))
  assert info.conversion == "gray"
  np.testing.assert_array_equal(arr, np.repeat(gray[..., None], 3, axis=-1))

  bits = Image.fromarray(np.array([[0, 255, 0], [255, 255, 0]], np.uint8)).convert("1")
  arr, info = load_rgb(_save(bits, tmp_path, "b.png"))
  assert (info.mode, info.conversion) == ("1", "bilevel")
  assert arr[..., 0].tolist() == [[0, 255, 0], [255, 255, 0]]

  cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))  # full magenta + yellow ink = red
  arr, info = load_rgb(_save(cmyk, tmp_path, "c.jpg", quality=100))
  assert (info.mode, info.conversion) == ("CMYK", "cmyk")
  assert np.abs(arr.astype(int) - [255, 0, 0]).max() <= 3


def test_sixteen_bit_png_scaled_to_8_bit(tmp_path):
  values = np.array([[0, 257, 32896], [65535, 1000, 65280]], np.uint16)
  path = _save(Image.fromarray(values), tmp_path, "g16.png")
  assert Image.open(path).mode.startswith("I")
  arr, info = load_rgb(path)
  assert info.conversion == "16bit"
  expect = np.round(values / 65535 * 255).astype(np.uint8)
  np.testing.assert_array_equal(arr[..., 0], expect)
  np.testing.assert_array_equal(arr[..., 1], expect)


def test_animated_gif_first_frame(tmp_path):
  frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
  path = tmp_path / "anim.gif"
  frames[0].save(path, save_all=True, append_images=frames[1:])
  arr, info = load_rgb(path)
  assert info.n_frames == 2 and arr[0, 0].tolist() == [255, 0, 0]


def _reason(src, **kw):
  with pytest.raises(BadImageError) as e:
    load_rgb(src, **kw)
  return e.value.reason


def test_bad_files_have_clear_reasons(tmp_path):
  assert _reason(tmp_path / "nope.png") == "missing file"
  (tmp_path / "empty.jpg").write_bytes(b"")
  assert "zero-byte" in _reason(tmp_path / "empty.jpg")
  assert "zero-byte" in _reason(b"")
  (tmp_path / "text.png").write_bytes(b"this is not an image at all")
  assert "not a recognized image format" in _reason(tmp_path / "text.png")
  assert "directory" in _reason(tmp_path)

  rng = np.random.default_rng(0)
  noisy = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
  data = _png_bytes(noisy)
  assert "truncated or corrupt" in _reason(data[: len(data) // 2])
  buf = io.BytesIO()
  noisy.save(buf, format="JPEG")
  jpeg = buf.getvalue()
  assert "truncated or corrupt" in _reason(jpeg[: len(jpeg) // 2])
  # A flipped byte in the compressed PNG stream (CRC / zlib error).
  corrupt = bytearray(data)
  corrupt[len(data) // 2] ^= 0xFF
  assert "corrupt" in _reason(bytes(corrupt))

  small = _png_bytes(Image.new("RGB", (40, 8)))
  assert _reason(small, min_size=16) == "too small: 40x8, shorter side < 16"
  assert load_rgb(small, min_size=8)[0].shape == (8, 40, 3)

  buf = io.BytesIO()
  Image.fromarray(np.zeros((4, 4), np.float32), "F").save(buf, format="TIFF")
  assert _reason(buf.getvalue()) == "unsupported mode F"


def test_a_tiff_whose_second_page_has_no_size_is_a_bad_file():
  """PIL raises TypeError ("Missing dimensions") reading the page count of such a file; it must
  be a bad input like any damaged file, not the end of a precompute job."""
  pages = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
  buf = io.BytesIO()
  pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
  data = bytearray(buf.getvalue())
  width_tag = b"\x00\x01\x04\x00"  # ImageWidth (256), LONG, little-endian
  second = data.find(width_tag, data.find(width_tag) + 1)
  data[second:second + 2] = b"\x99\x01"  # an unknown tag instead: page 2 has no width
  with pytest.raises(TypeError):
    getattr(Image.open(io.BytesIO(bytes(data))), "n_frames")
  assert "Missing dimensions" in _reason(bytes(data))


def test_sixteen_bit_conversion_spans_row_blocks_in_little_memory():
  rows = 12 * images._ROWS_PER_BLOCK + 5
  values = (np.arange(rows * 700) * 37 % 65536).astype(np.uint16).reshape(rows, 700)
  image = Image.fromarray(values)
  import tracemalloc
  tracemalloc.start()
  try:
    gray = images._sixteen_bit_to_gray(image, "x")
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  np.testing.assert_array_equal(np.asarray(gray), np.round(values / 65535 * 255).astype(np.uint8))
  # PIL's bytes and their array, the uint8 result, a block in uint32 (an int64 copy alone is 4x).
  assert peak < 3 * values.nbytes, peak


def test_a_pipe_is_not_read(tmp_path):
  """A FIFO named like an image would block the reading thread forever."""
  import threading
  fifo = tmp_path / "pipe.png"
  os.mkfifo(fifo)
  reasons = []
  reader = threading.Thread(target=lambda: reasons.append(_reason(fifo)), daemon=True)
  reader.start()
  reader.join(30)
  assert reasons == ["not a regular file (a pipe, device or socket)"]


def test_error_names_the_source(tmp_path):
  path = tmp_path / "empty.png"
  path.write_bytes(b"")
  with pytest.raises(BadImageError, match="empty.png"):
    load_rgb(path)


def test_imagenet_normalize_matches_torch_reference():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
  # torchvision ToTensor + Normalize, written with torch ops: x / 255, then (x - m) / s in fp32.
  t = torch.from_numpy(x).permute(2, 0, 1).float().div(255)
  mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
  ref = ((t - mean) / std).permute(1, 2, 0).numpy()
  out = images.imagenet_normalize(x)
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, ref)
  # [0, 1] floats (e.g. (x + 1) / 2 of a decoder output) take the same path.
  np.testing.assert_array_equal(images.imagenet_normalize(t.permute(1, 2, 0).numpy()), ref)
  np.testing.assert_allclose(np.asarray(images.imagenet_normalize(jnp.asarray(x))), ref,
                             rtol=0, atol=1e-6)


def test_to_minus_one_one():
  x = np.array([[[0, 255, 128]]], np.uint8)
  np.testing.assert_allclose(images.to_minus_one_one(x), [[[-1.0, 1.0, 128 / 127.5 - 1]]],
                             atol=1e-6)
  np.testing.assert_allclose(images.to_minus_one_one(np.array([0.0, 0.5, 1.0])), [-1, 0, 1])
