"""Synthetic record datasets for tests and benchmarks: random latents and caption features in
the real record schema, optionally learnable (a fixed caption -> latent map a DiT can fit)."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from svg_jax.data import records

PAD_ID, BOS_ID = 0, 1  # token ids of the synthetic vocabulary; words start at 2


def _world(world_seed: int, vocab_size: int, text_dim: int, channels: int) -> dict:
  """The fixed caption -> latent map of the learnable synthetic data (independent of the seed)."""
  rng = np.random.default_rng(world_seed)
  return {
      "embed": rng.standard_normal((vocab_size, max(text_dim, 1))).astype(np.float32),
      "word_latent": rng.standard_normal((vocab_size, channels)).astype(np.float32),
      "word_slope": rng.standard_normal((vocab_size, channels)).astype(np.float32),
  }


def write_random_dataset(
    directory: str | os.PathLike, *,
    buckets: Sequence[Sequence[int]] = ((4, 4), (4, 6)),
    num_records: int | Sequence[int] = 16,
    latent_channels: int = 8,
    text_dim: int = 16,
    text_kind: str = "text_features",
    caption_len: tuple[int, int] = (1, 12),
    vocab_size: int = 64,
    learnable: bool = False,
    noise_std: float = 0.05,
    records_per_shard: int = 8,
    seed: int = 0,
    world_seed: int = 1234,
    fingerprints: Mapping[str, str] | None = None,
    compression: str = records.DEFAULT_COMPRESSION,
) -> dict:
  """Writes a synthetic dataset for tests and returns its manifest.

  Args:
    buckets: (h, w) latent-unit buckets.
    num_records: total (spread round-robin over buckets) or one count per bucket.
    latent_channels, text_dim: C of the latent and D of text_features.
    text_kind: "text_features" or "token_ids".
    caption_len: (min, max) number of words per caption, uniform; text_len = words + 1 (<bos>).
    vocab_size: size of the synthetic vocabulary (ids 0 pad, 1 <bos>, words from 2).
    learnable: if True the latent is a fixed function of the caption words plus `noise_std` noise:
      latent[y, x] = mean over words of (a_word + ramp(y, x) * b_word), so a text-conditioned model
      can drive the loss well below that of an unconditional one. The mapping depends only on
      `world_seed`, so datasets written with different `seed`s (train / eval) share it.
      If False the latent is i.i.d. N(0, 1).
    seed: draws the captions, noise and sizes.
    fingerprints: written into the manifest (defaults to fixed test strings).
    compression: of the shards (see `COMPRESSIONS`).
  """
  if text_kind not in records.TEXT_FIELDS:
    raise ValueError(f"text_kind must be one of {records.TEXT_FIELDS}, got {text_kind!r}")
  lo, hi = caption_len
  if not 0 <= lo <= hi:
    raise ValueError(f"caption_len must be (min, max) with 0 <= min <= max, got {caption_len}")
  if vocab_size < 3:
    raise ValueError("vocab_size must be >= 3 (pad, bos and at least one word)")
  buckets = [tuple(int(v) for v in b) for b in buckets]
  if isinstance(num_records, int):
    counts = [num_records // len(buckets) + (i < num_records % len(buckets))
              for i in range(len(buckets))]
  else:
    counts = [int(c) for c in num_records]
    if len(counts) != len(buckets):
      raise ValueError(f"{len(counts)} counts for {len(buckets)} buckets")
  if fingerprints is None:
    fingerprints = {k: f"test-{k}" for k in records.FINGERPRINT_KEYS}
  world = _world(world_seed, vocab_size, text_dim, latent_channels)
  rng = np.random.default_rng(seed)
  order = [i for i, c in enumerate(counts) for _ in range(c)]
  rng.shuffle(order)
  with records.DatasetWriter(directory, fingerprints=fingerprints, records_per_shard=records_per_shard,
                     compression=compression) as writer:
    for n, b in enumerate(order):
      h, w = buckets[b]
      words = rng.integers(2, vocab_size, size=int(rng.integers(lo, hi + 1)))
      ids = np.concatenate([[BOS_ID], words]).astype(np.int32)
      if learnable:
        ramp = (np.linspace(-1, 1, h)[:, None, None] + np.linspace(-1, 1, w)[None, :, None]) / 2
        # An empty caption maps to the zero latent (plus noise).
        a = world["word_latent"][words].mean(0) if len(words) else 0.0
        s = world["word_slope"][words].mean(0) if len(words) else 0.0
        latent = a + ramp * s + noise_std * rng.standard_normal((h, w, latent_channels))
      else:
        latent = rng.standard_normal((h, w, latent_channels))
      rec = {
          "latent": latent.astype(np.float32),
          "caption": " ".join(f"w{i}" for i in words),
          "text_len": len(ids),
          "bucket": (h, w),
          "orig_size": (16 * w + int(rng.integers(0, 64)), 16 * h + int(rng.integers(0, 64))),
          "source": f"synthetic/{seed}/{n:06d}",
      }
      if text_kind == "text_features":
        rec["text_features"] = world["embed"][ids][:, :text_dim]
      else:
        rec["token_ids"] = ids
      writer.add(rec)
  return records.read_manifest(directory)
