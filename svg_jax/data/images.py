"""Image decoding to 8-bit RGB, with clear errors for bad files, and the pixel normalizations.

`open_rgb` turns whatever PIL can open into a (fully loaded) RGB PIL image plus an `ImageInfo`
saying what was done, or raises `BadImageError` whose `reason` names the problem (missing, empty,
truncated / corrupt, too small, unsupported mode), so a long precompute job can count and report
bad inputs by key instead of crashing (docs/design.md, Data).

Mode handling (the official DiT loader composites RGBA on white and converts P and L to RGB;
it skips every other mode; we convert more modes and record which conversion was applied):
  RGB                      as is
  RGBA, LA, PA, RGBa       alpha-composited on white (PIL paste with the alpha as mask, as official)
  P                        with transparency: composited on white like RGBA; without: to RGB
                           (official converts every P image straight to RGB, which shows the
                           palette colour of transparent pixels)
  L, 1, RGBX, YCbCr        converted to RGB (1-bit gives 0 / 255)
  CMYK                     converted to RGB by PIL's formula (no ICC colour management)
  I;16*, I (16-bit PNG)    scaled to 8 bit (v * 255 / 65535, rounded), then gray to RGB
  anything else (F, ...)   BadImageError("unsupported mode ...")
Animated files give their first frame. EXIF orientation is not applied (the official loader does
not apply it either); `ImageInfo.exif_orientation` says when a file asks for it, so jobs can count
the images they take as stored.
"""
from __future__ import annotations

import dataclasses
import io
import os
import stat
from typing import Any, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

PathOrBytes = Union[str, os.PathLike, bytes, bytearray, memoryview]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")
_DIRECT_MODES = ("L", "1", "RGBX", "YCbCr", "CMYK")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ROWS_PER_BLOCK = 256


class BadImageError(ValueError):
  """An image that cannot be used; `reason` is a short phrase naming the problem."""

  def __init__(self, reason: str, source: str = ""):
    self.reason = reason
    self.source = source
    super().__init__(f"{source}: {reason}" if source else reason)


@dataclasses.dataclass(frozen=True)
class ImageInfo:
  """What the file was and what `open_rgb` did to it."""
  format: str | None  # PIL format name ("PNG", "JPEG", ...)
  mode: str  # PIL mode of the decoded file
  width: int
  height: int
  conversion: str  # "none", "alpha_on_white", "palette", "gray", "bilevel", "cmyk", "16bit", ...
  n_frames: int = 1
  exif_orientation: int = 1  # the EXIF Orientation tag (1: upright), read but not applied


def _read_bytes(src: PathOrBytes) -> tuple[bytes, str]:
  if isinstance(src, (bytes, bytearray, memoryview)):
    data, name = bytes(src), "<bytes>"
  else:
    name = os.fspath(src)
    if not os.path.exists(name):
      raise BadImageError("missing file", name)
    if os.path.isdir(name):
      raise BadImageError("is a directory, not an image file", name)
    try:
      if not stat.S_ISREG(os.stat(name).st_mode):  # a pipe would block the job, /dev/zero fill it
        raise BadImageError("not a regular file (a pipe, device or socket)", name)
      with open(name, "rb") as f:
        data = f.read()
    except OSError as e:
      raise BadImageError(f"unreadable file ({e.strerror or e})", name) from e
  if not data:
    raise BadImageError("empty (zero-byte) data", name)
  return data, name


def _on_white(image: Image.Image) -> Image.Image:
  """Alpha-composite on white the way the official `to_rgb_if_rgba` does (paste with a mask)."""
  rgba = image.convert("RGBA")
  out = Image.new("RGB", rgba.size, (255, 255, 255))
  out.paste(rgba, mask=rgba.getchannel("A"))
  return out


def _sixteen_bit_to_gray(image: Image.Image, name: str) -> Image.Image:
  arr = np.asarray(image)
  if arr.size and (arr.min() < 0 or arr.max() > 65535):
    raise BadImageError(f"unsupported mode {image.mode} with values outside 0..65535", name)
  out = np.empty(arr.shape, np.uint8)
  # By row blocks in uint32: a whole 13000x13000 image in int64 took 3 GB in one thread.
  for r in range(0, arr.shape[0], _ROWS_PER_BLOCK):
    block = arr[r:r + _ROWS_PER_BLOCK].astype(np.uint32)
    block *= 255
    block += 32767
    block //= 65535
    out[r:r + _ROWS_PER_BLOCK] = block
  return Image.fromarray(out, mode="L")


def _to_rgb(image: Image.Image, name: str) -> tuple[Image.Image, str]:
  mode = image.mode
  if mode == "RGB":
    return image, "none"
  if mode in _ALPHA_MODES:
    return _on_white(image), "alpha_on_white"
  if mode == "P":
    if "transparency" in image.info:
      return _on_white(image), "palette_alpha_on_white"
    return image.convert("RGB"), "palette"
  if mode in _SIXTEEN_BIT_MODES:
    return _sixteen_bit_to_gray(image, name).convert("RGB"), "16bit"
  if mode in _DIRECT_MODES:
    kind = {"L": "gray", "1": "bilevel", "CMYK": "cmyk"}.get(mode, mode.lower())
    return image.convert("RGB"), kind
  raise BadImageError(f"unsupported mode {mode}", name)


def open_rgb(src: PathOrBytes, min_size: int = 1) -> tuple[Image.Image, ImageInfo]:
  """Decode to an RGB PIL image (fully loaded), or raise BadImageError.

  `min_size`: the shorter side must be at least this many pixels.
  """
  data, name = _read_bytes(src)
  try:
    image = Image.open(io.BytesIO(data))
    fmt, n_frames = image.format, getattr(image, "n_frames", 1)
  except UnidentifiedImageError as e:
    raise BadImageError("not a recognized image format (corrupt data?)", name) from e
  except Image.DecompressionBombError as e:
    raise BadImageError(f"too many pixels ({e})", name) from e
  except MemoryError:
    raise
  except Exception as e:  # noqa: BLE001  (PIL's decoders raise many types on damaged files)
    raise BadImageError(f"corrupt header ({type(e).__name__}: {e})", name) from e
  try:
    image.load()  # decodes now: truncation and corruption surface here, not later
    w, h = image.size
    if min(w, h) < min_size:
      raise BadImageError(f"too small: {w}x{h}, shorter side < {min_size}", name)
    rgb, conversion = _to_rgb(image, name)
    orientation = _exif_orientation(image)
  except (BadImageError, MemoryError):
    raise
  except Image.DecompressionBombError as e:
    raise BadImageError(f"too many pixels ({e})", name) from e
  except Exception as e:  # noqa: BLE001  (as above: a damaged TIFF raises TypeError here)
    raise BadImageError(f"truncated or corrupt data ({type(e).__name__}: {e})", name) from e
  return rgb, ImageInfo(fmt, image.mode, w, h, conversion, n_frames, orientation)


_EXIF_ORIENTATION_TAG = 0x0112


def _exif_orientation(image: Image.Image) -> int:
  try:
    value = int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
  except Exception:  # noqa: BLE001  (damaged EXIF: the pixels decoded, the tag is unknown)
    return 1
  return value if 1 <= value <= 8 else 1


def _unit_float(x: Any):
  """uint8 -> x / 255 in float32 (as torchvision ToTensor); float input is taken as [0, 1]."""
  if x.dtype == np.uint8:
    return x.astype(np.float32) / np.float32(255)
  return x.astype(np.float32)


def imagenet_normalize(x: Any):
  """Channel-last RGB, uint8 or float in [0, 1] -> (x - mean) / std with the ImageNet stats.

  Works on numpy and jax arrays; the arithmetic is fp32 in the order torchvision uses
  (ToTensor then Normalize), so the DINOv3 input matches the official one.
  """
  mean = np.asarray(IMAGENET_MEAN, np.float32)
  std = np.asarray(IMAGENET_STD, np.float32)
  return (_unit_float(x) - mean) / std


def to_minus_one_one(x: Any):
  """Channel-last RGB, uint8 or float in [0, 1] -> [-1, 1] (torchvision Normalize(0.5, 0.5))."""
  return (_unit_float(x) - np.float32(0.5)) / np.float32(0.5)
