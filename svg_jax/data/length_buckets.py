"""Caption-length buckets: choosing them from a length distribution, and measuring padding waste.

A static-shape batch holds one aspect bucket (image tokens fixed) and pads its captions to one
length bucket, so the padded tokens of a batch are sum(bucket - len_i). Two levers cut that waste:
  * which buckets: `optimal_length_buckets` picks the k bucket lengths (multiples of `multiple`)
    that minimize the total padding of a length sample (exact dynamic programme);
  * how batches form: grouping records by length bucket before batching makes every caption in a
    batch pay only its own bucket's padding instead of the longest caption's.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from svg_jax.utils.rounding import round_up


def bucket_of(lengths, buckets: Sequence[int]) -> np.ndarray:
  """The smallest bucket >= each length (lengths above the last bucket are truncated to it)."""
  buckets = np.asarray(sorted(buckets))
  idx = np.searchsorted(buckets, np.minimum(np.asarray(lengths), buckets[-1]), side="left")
  return buckets[idx]


def optimal_length_buckets(lengths: Sequence[int], num_buckets: int, multiple: int = 8,
                           max_len: int | None = None) -> tuple[int, ...]:
  """The `num_buckets` bucket lengths (multiples of `multiple`, the last = max_len or the longest)
  minimizing sum over samples of (bucket(len) - len)."""
  lengths = np.asarray(lengths, np.int64)
  top = round_up(int(max_len if max_len is not None else lengths.max()), multiple)
  lengths = np.minimum(lengths, top)
  cands = np.arange(multiple, top + 1, multiple)
  counts = np.array([np.sum((lengths > c - multiple) & (lengths <= c)) for c in cands])
  sums = np.array([lengths[(lengths > c - multiple) & (lengths <= c)].sum() for c in cands])
  cum_n, cum_s = np.concatenate([[0], np.cumsum(counts)]), np.concatenate([[0], np.cumsum(sums)])
  n = len(cands)

  def cost(i, j):  # candidates i..j (inclusive) all padded to cands[j]
    return cands[j] * (cum_n[j + 1] - cum_n[i]) - (cum_s[j + 1] - cum_s[i])

  k = min(num_buckets, n)
  best = np.full((k + 1, n), np.inf)
  arg = np.zeros((k + 1, n), np.int64)
  for j in range(n):
    best[1, j] = cost(0, j)
  for b in range(2, k + 1):
    for j in range(n):
      for i in range(b - 1, j + 1):  # last bucket covers candidates i..j
        c = best[b - 1, i - 1] + cost(i, j)
        if c < best[b, j]:
          best[b, j], arg[b, j] = c, i
  chosen, j, b = [], n - 1, int(np.argmin(best[1:, n - 1])) + 1
  while b >= 1:
    chosen.append(int(cands[j]))
    if b == 1:
      break
    j, b = arg[b, j] - 1, b - 1
  return tuple(sorted(chosen))


def padding_fraction(lengths: Sequence[int], image_tokens: int, buckets: Sequence[int],
                     batch_size: int, group_by_length: bool, seed: int = 0) -> float:
  """Fraction of the joint-sequence tokens (image + padded caption) that are caption padding, for
  random batches of `batch_size` drawn from `lengths` as the pipeline would form them."""
  lengths = np.minimum(np.asarray(lengths, np.int64), max(buckets))
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(lengths))
  if group_by_length:  # batches never mix length buckets
    per_bucket = bucket_of(lengths, buckets)
    groups = [order[per_bucket[order] == b] for b in sorted(set(per_bucket.tolist()))]
  else:
    groups = [order]
  padded = valid = 0
  for group in groups:
    for start in range(0, len(group) - batch_size + 1, batch_size):
      batch = lengths[group[start:start + batch_size]]
      pad_to = int(bucket_of([batch.max()], buckets)[0])
      padded += int(np.sum(pad_to - batch))
      valid += int(np.sum(batch)) + batch_size * image_tokens
  return padded / max(padded + valid, 1)
