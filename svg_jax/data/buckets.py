"""Aspect-ratio buckets and the official center crop (docs/reference.md §2.4-2.5).

Sizes are (width, height) pairs throughout, as PIL's `Image.size` and the official code have them;
a latent or array made from a crop of size (w, h) is [h, w, ...] (rows first).

The official DiT training picks, for each image, the bucket whose aspect ratio best matches it
(`var_center_crop(..., random_top_k=1)`), then center-crops the image to exactly that size.
"""
from __future__ import annotations

from typing import Sequence

from PIL import Image

Size = tuple[int, int]  # (width, height)


def num_patches_for_resolution(resolution: int, patch_size: int = 16) -> int:
  """Patch budget of a training resolution: round((resolution / patch_size)^2), as official."""
  return round((resolution / patch_size) ** 2)


def generate_crop_size_list(num_patches: int, patch_size: int, max_ratio: float = 4.0
                            ) -> list[Size]:
  """The official bucket list: (width, height) pairs in pixels, in the official order.

  Walks (wp, hp) patch counts from (num_patches, 1): hp grows while (hp + 1) * wp still fits
  the budget, otherwise wp shrinks. A pair is kept when its aspect ratio is at most `max_ratio`
  and both pixel sizes satisfy (size // 32) % 2 == 0 (an official quirk: with 16 px patches
  this keeps patch counts = 0 or 1 mod 4).
  """
  if max_ratio < 1.0:
    raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
  sizes = []
  wp, hp = num_patches, 1
  while wp > 0:
    w, h = wp * patch_size, hp * patch_size
    if max(wp, hp) / min(wp, hp) <= max_ratio and (w // 32) % 2 == 0 and (h // 32) % 2 == 0:
      sizes.append((w, h))
    if (hp + 1) * wp <= num_patches:
      hp += 1
    else:
      wp -= 1
  return sizes


def buckets_for_resolution(resolution: int, patch_size: int = 16, max_ratio: float = 4.0
                           ) -> list[Size]:
  """Buckets of a training stage: 15 at 256, 27 at 512, 51 at 1024 (max_ratio 4)."""
  return generate_crop_size_list(num_patches_for_resolution(resolution, patch_size), patch_size,
                                 max_ratio)


def bucket_score(width: int, height: int, bucket: Size) -> float:
  """min(cw/w, ch/h) / max(cw/w, ch/h): 1 when the aspect ratios are equal."""
  cw, ch = bucket
  rw, rh = cw / width, ch / height
  return min(rw, rh) / max(rw, rh)


def closest_bucket(width: int, height: int, buckets: Sequence[Size]) -> Size:
  """The bucket the official `var_center_crop(random_top_k=1)` picks for a width x height image.

  Officially: sort (score, bucket) pairs descending and take the first, so a tie in score goes
  to the larger (cw, ch) tuple; `max` over the same pairs gives the same choice.
  """
  if not buckets:
    raise ValueError("no buckets to choose from")
  if width <= 0 or height <= 0:
    raise ValueError(f"image size must be positive, got {width}x{height}")
  return max((bucket_score(width, height, tuple(b)), tuple(b)) for b in buckets)[1]


def box_halvings(size: Size, crop: Size) -> int:
  """How many times `center_crop` halves an image of `size` before its bicubic resize."""
  (w, h), (cw, ch) = size, crop
  n = 0
  while w >= 2 * cw and h >= 2 * ch:
    w, h, n = w // 2, h // 2, n + 1
  return n


def center_crop(image: Image.Image, crop: Size) -> Image.Image:
  """The official `center_crop` to crop = (width, height).

  1. While both sides are >= 2x the crop, halve with BOX resampling (floor of the halved sizes).
  2. BICUBIC-resize so the image covers the crop: scale = max(cw / w, ch / h), sizes rounded
     with Python's round (half to even).
  3. Cut the centred crop; the left / top offset is floor((size - crop) / 2).
  """
  cw, ch = crop
  if cw <= 0 or ch <= 0:
    raise ValueError(f"crop size must be positive, got {crop}")
  for _ in range(box_halvings(image.size, crop)):
    image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
  scale = max(cw / image.width, ch / image.height)
  image = image.resize((round(image.width * scale), round(image.height * scale)),
                       resample=Image.BICUBIC)
  left, top = (image.width - cw) // 2, (image.height - ch) // 2
  return image.crop((left, top, left + cw, top + ch))


def latent_hw(bucket: Size, patch_size: int = 16) -> tuple[int, int]:
  """Pixel bucket (width, height) -> latent grid (rows, cols) = (height / p, width / p)."""
  w, h = bucket
  if w % patch_size or h % patch_size:
    raise ValueError(f"bucket {w}x{h} is not a multiple of the patch size {patch_size}")
  return h // patch_size, w // patch_size


def bucket_crop(image: Image.Image, buckets: Sequence[Size]) -> tuple[Image.Image, Size]:
  """Center-crop to the closest bucket (official `var_center_crop` with random_top_k=1)."""
  bucket = closest_bucket(image.width, image.height, buckets)
  return center_crop(image, bucket), bucket
