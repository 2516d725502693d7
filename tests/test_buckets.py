"""Aspect-ratio buckets (docs/reference.md §2.5) and the official center crop (§2.4)."""
import os

import numpy as np
import pytest
from PIL import Image

from svg_jax.data import buckets

# docs/reference.md §2.5, 256 px stage, (width, height) in the official enumeration order.
BUCKETS_256 = [(512, 128), (464, 128), (448, 128), (448, 144), (400, 144), (336, 192), (320, 192),
               (256, 256), (192, 320), (192, 336), (144, 400), (144, 448), (128, 448), (128, 464),
               (128, 512)]


def test_buckets_256_exact():
  assert buckets.num_patches_for_resolution(256) == 256
  assert buckets.generate_crop_size_list(256, 16) == BUCKETS_256
  assert buckets.buckets_for_resolution(256) == BUCKETS_256


@pytest.mark.parametrize("res,count,first,middle", [
    (512, 27, (1024, 256), [(576, 448), (512, 512), (448, 576)]),
    (1024, 51, (2048, 512), [(1088, 960), (1024, 1024), (960, 1088)]),
])
def test_buckets_512_1024(res, count, first, middle):
  sizes = buckets.buckets_for_resolution(res)
  assert len(sizes) == count
  assert sizes[0] == first and sizes[-1] == first[::-1]
  mid = len(sizes) // 2
  assert sizes[mid - 1:mid + 2] == middle
  budget = (res // 16) ** 2
  for w, h in sizes:
    assert (w // 16) * (h // 16) <= budget
    assert max(w, h) / min(w, h) <= 4
    assert (w // 16) % 4 in (0, 1) and (h // 16) % 4 in (0, 1)  # the official quirk
  assert sizes == [s[::-1] for s in reversed(sizes)]  # symmetric under transposition


def test_latent_hw_is_rows_first():
  assert buckets.latent_hw((512, 128)) == (8, 32)
  assert [buckets.latent_hw(b) for b in BUCKETS_256][7] == (16, 16)
  with pytest.raises(ValueError, match="multiple"):
    buckets.latent_hw((100, 64))


def test_single_shape_and_bad_ratio():
  assert buckets.buckets_for_resolution(256, max_ratio=1.0) == [(256, 256)]
  with pytest.raises(ValueError, match="max_ratio"):
    buckets.generate_crop_size_list(256, 16, max_ratio=0.5)


def test_closest_bucket():
  assert buckets.closest_bucket(1000, 1000, BUCKETS_256) == (256, 256)
  assert buckets.closest_bucket(1000, 250, BUCKETS_256) == (512, 128)
  assert buckets.closest_bucket(250, 1000, BUCKETS_256) == (128, 512)
  # hello.png is 1920 x 1401 (aspect 1.37): 320x192 scores 0.822, 336x192 0.783, 256x256 0.730.
  assert buckets.closest_bucket(1920, 1401, BUCKETS_256) == (320, 192)
  # Width and height are not interchangeable.
  assert buckets.closest_bucket(1401, 1920, BUCKETS_256) == (192, 320)
  # Equal scores: the official descending sort of (score, bucket) keeps the larger tuple.
  assert buckets.closest_bucket(300, 300, [(100, 200), (200, 100)]) == (200, 100)
  assert buckets.bucket_score(640, 480, (320, 240)) == 1.0
  with pytest.raises(ValueError):
    buckets.closest_bucket(10, 10, [])


def test_center_crop_halves_with_box_not_reduce():
  # The official halving is `resize(size // 2, BOX)`. On even sizes it is the 2x2 mean, like
  # `Image.reduce(2)`, but PIL's fixed-point resize rounds differently: up to 1 LSB apart on
  # ~40% of random pixels, while reduce(2) is the correctly rounded mean.
  rng = np.random.default_rng(0)
  arr = rng.integers(0, 256, (38, 52, 3), dtype=np.uint8)
  img = Image.fromarray(arr)
  halved = np.asarray(img.resize((26, 19), resample=Image.BOX)).astype(int)
  reduced = np.asarray(img.reduce(2)).astype(int)
  mean = arr.reshape(19, 2, 26, 2, 3).mean(axis=(1, 3))
  assert np.abs(reduced - mean).max() <= 0.5
  assert np.abs(halved - reduced).max() <= 1 and np.abs(halved - mean).max() <= 1
  assert (halved != reduced).mean() > 0.2  # so the check below tells the two apart
  # 52x38 to 26x19: one BOX halving, then the official BICUBIC step at scale 1 and a full crop.
  want = img.resize((26, 19), resample=Image.BOX).resize((26, 19), resample=Image.BICUBIC)
  want = np.asarray(want.crop((0, 0, 26, 19)))
  np.testing.assert_array_equal(want, halved)  # the scale-1 bicubic and the crop change nothing
  np.testing.assert_array_equal(np.asarray(buckets.center_crop(img, (26, 19))), want)
  # Bit-exact where each 2x2 block is constant (no rounding involved).
  blocky = Image.fromarray(np.kron(arr[:19, :26], np.ones((2, 2, 1), np.uint8)))
  np.testing.assert_array_equal(np.asarray(blocky.resize((26, 19), resample=Image.BOX)),
                                np.asarray(blocky.reduce(2)))


@pytest.mark.parametrize("size,crop,halvings", [
    ((1024, 1024), (256, 256), 2), ((1023, 1023), (256, 256), 1), ((2048, 600), (512, 128), 2),
    ((600, 2048), (512, 128), 0), ((100, 50), (256, 256), 0), ((4000, 3000), (320, 192), 3)])
def test_center_crop_sizes(size, crop, halvings):
  assert buckets.box_halvings(size, crop) == halvings
  img = Image.new("RGB", size, (1, 2, 3))
  out = buckets.center_crop(img, crop)
  assert out.size == crop and out.mode == "RGB"


def test_center_crop_solid_colour_is_exact():
  for size, crop in [((5, 3), (16, 16)), ((1000, 333), (256, 256)), ((777, 2100), (192, 336))]:
    out = np.asarray(buckets.center_crop(Image.new("RGB", size, (10, 200, 77)), crop))
    assert out.shape == (crop[1], crop[0], 3)
    assert (out == np.array([10, 200, 77], np.uint8)).all()


def _blocks(grid, block):
  """An image made of block x block squares of constant colour, one per grid cell."""
  return Image.fromarray(np.kron(grid, np.ones((block, block, 1), np.uint8)))


@pytest.mark.parametrize("grid_w,left", [(10, 1), (11, 1), (8, 0)])
def test_center_crop_halves_then_crops_centre(grid_w, left):
  # 4x4 constant blocks: two BOX halvings map each block to one pixel exactly; the grid then
  # covers the 8x6 crop at scale 1 (no bicubic change), so the result is the centred sub-grid,
  # left offset floor((grid_w - 8) / 2), top 0.
  grid = np.random.default_rng(grid_w).integers(0, 256, (6, grid_w, 3), dtype=np.uint8)
  img = _blocks(grid, 4)
  assert buckets.box_halvings(img.size, (8, 6)) == 2
  out = np.asarray(buckets.center_crop(img, (8, 6)))
  np.testing.assert_array_equal(out, grid[:, left:left + 8])


def test_center_crop_rounds_half_to_even():
  # 2x5 image, crop 5x12: scale = max(5/2, 12/5) = 2.5, so the height 12.5 rounds to 12 with
  # Python's round (the official code); the whole resized image is the crop.
  rng = np.random.default_rng(1)
  img = Image.fromarray(rng.integers(0, 256, (5, 2, 3), dtype=np.uint8))
  out = buckets.center_crop(img, (5, 12))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(img.resize((5, 12), Image.BICUBIC)))


def test_bucket_crop_real_image():
  img = Image.open(os.path.join(os.path.dirname(__file__), "assets", "hello.png")).convert("RGB")
  out, bucket = buckets.bucket_crop(img, BUCKETS_256)
  assert bucket == (320, 192) and out.size == (320, 192)
  # The official recipe by hand: 1920x1401 -BOX-> 960x700 -BOX-> 480x350 (480 < 2 * 320 stops
  # it); scale max(320/480, 192/350) = 2/3 -BICUBIC-> 320x233; centred crop, top (233-192)//2.
  want = img.resize((960, 700), resample=Image.BOX).resize((480, 350), resample=Image.BOX)
  want = want.resize((320, 233), resample=Image.BICUBIC).crop((0, 20, 320, 212))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
