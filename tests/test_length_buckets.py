"""Caption-length buckets: the dynamic programme finds the padding optimum an exhaustive search finds,
and the padding simulation counts what the pipeline pads."""
import itertools

import numpy as np

from svg_jax.data import length_buckets as lb


def _padding(lengths, buckets):
  return int(np.sum(lb.bucket_of(lengths, buckets) - np.minimum(lengths, max(buckets))))


def test_optimal_buckets_match_exhaustive_search():
  rng = np.random.default_rng(0)
  for trial in range(5):
    lengths = np.concatenate([rng.integers(3, 30, 50), rng.integers(40, 64, 20 + trial)])
    cands = list(range(8, 65, 8))
    for k in (1, 2, 3):
      chosen = lb.optimal_length_buckets(lengths, k, multiple=8, max_len=64)
      assert chosen[-1] == 64 and len(chosen) <= k
      best = min(_padding(lengths, combo + (64,))
                 for combo in itertools.combinations(cands[:-1], k - 1))
      assert _padding(lengths, chosen) == best


def test_padding_fraction_counts_pipeline_padding():
  lengths = np.array([10, 20, 30, 40])
  # one batch of 4 padded to bucket 64: padding (54+44+34+24) over that + 100 valid + 4*16 image
  frac = lb.padding_fraction(lengths, 16, (64,), batch_size=4, group_by_length=False)
  assert frac == 156 / (156 + 100 + 64)
  # grouped by bucket (32 | 64): {10, 12} -> 32 and {40, 44} -> 64, never one batch padded to 64
  grouped = lb.padding_fraction(np.array([10, 40, 12, 44]), 0, (32, 64), batch_size=2,
                                group_by_length=True)
  assert grouped == (22 + 20 + 24 + 20) / (86 + 106)


def test_pipeline_fits_buckets_to_the_manifest_histogram():
  from svg_jax.data.pipeline import PipelineConfig
  histogram = {"20": 300, "27": 500, "31": 200, "60": 10}  # json keys are strings
  fitted = PipelineConfig(4, max_caption_len=64, num_caption_buckets=3).length_buckets(histogram)
  # 24 | 32 | 64 pads 300*4 + 500*5 + 200*1 + 10*4 tokens, the least any 3 multiples of 8 can
  assert fitted == (24, 32, 64)
  lengths = np.repeat([20, 27, 31, 60], [300, 500, 200, 10])
  assert _padding(lengths, fitted) == 3940 < _padding(lengths, (32, 64))
  # explicit buckets win; no histogram or num_caption_buckets=0 falls back to multiples of 32
  assert PipelineConfig(4, max_caption_len=64, caption_len_buckets=(16, 64),
                        num_caption_buckets=3).length_buckets(histogram) == (16, 64)
  assert PipelineConfig(4, max_caption_len=64).length_buckets(histogram) == (32, 64)
