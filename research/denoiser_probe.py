"""Where a trained DiT departs from the ideal denoiser of its own training set.

For training records (latent x1, caption), x_t = t x1 + (1 - t) x0 with fresh noise x0. The DiT's
data estimate is x1_hat = x_t + (1 - t) v(x_t, t, caption). The reference is the exact posterior
mean E[x1 | x_t, caption] under the empirical distribution of the training latents that share the
caption (a Gaussian mixture: weights softmax(-|x_t - t x|^2 / (2 (1 - t)^2)) over those latents),
i.e. the denoiser a model would have if it learned the training set perfectly. The per-t mean-square
errors show at which noise levels the network is far from that ideal.

Two noise-free baselines bound what a model that generalizes should do where x_t holds almost no
signal (t -> 0): the mean latent of the record's caption (what the caption alone determines; any
model that reads its caption should beat it at every t) and the mean of all training latents (what
ignoring the caption gives).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def posterior_mean(x_t: np.ndarray, t: float, candidates: np.ndarray) -> np.ndarray:
  """E[x1 | x_t] for x1 uniform over `candidates` [K, ...] and x_t = t x1 + (1 - t) N(0, I)."""
  if not 0.0 <= t < 1.0:
    raise ValueError(f"t must be in [0, 1), got {t}")
  flat = candidates.reshape(len(candidates), -1).astype(np.float64)
  d = np.sum((x_t.reshape(1, -1).astype(np.float64) - t * flat) ** 2, axis=1)
  log_w = -d / (2.0 * (1.0 - t) ** 2)
  w = np.exp(log_w - log_w.max())
  return (w @ flat / w.sum()).reshape(candidates.shape[1:])


def probe(velocity: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
          latents: np.ndarray, captions: Sequence[str], rows: Sequence[int],
          times: Sequence[float], seed: int = 0) -> list[dict]:
  """Per t: mean-square error of the DiT's x1_hat against x1, against the posterior mean and against
the caption's mean latent, and the errors of the posterior and of the two baselines against x1.

  velocity(x_t [B, h, w, C], t [B], rows [B]) -> v [B, h, w, C]: the DiT on the captions of `rows`.
  latents [N, h, w, C] and captions [N] are the training set; rows index the probed records.
  """
  rows = np.asarray(rows)
  x1 = latents[rows].astype(np.float32)
  same = {c: np.flatnonzero(np.asarray(captions) == c) for c in {captions[i] for i in rows}}
  caption_mean = np.stack([latents[same[captions[i]]].astype(np.float64).mean(0) for i in rows])
  global_mean = latents.astype(np.float64).mean(0)
  rng = np.random.default_rng(seed)
  out = []
  for t in times:
    x0 = rng.standard_normal(x1.shape).astype(np.float32)
    x_t = t * x1 + (1 - t) * x0
    v = np.asarray(velocity(x_t, np.full(len(rows), t, np.float32), rows), np.float32)
    x1_hat = x_t + (1 - t) * v
    post = np.stack([posterior_mean(x_t[j], t, latents[same[captions[i]]])
                     for j, i in enumerate(rows)])
    out.append({"t": float(t),
                "dit_vs_x1": float(np.mean((x1_hat - x1) ** 2)),
                "posterior_vs_x1": float(np.mean((post - x1) ** 2)),
                "dit_vs_posterior": float(np.mean((x1_hat - post) ** 2)),
                "dit_vs_caption_mean": float(np.mean((x1_hat - caption_mean) ** 2)),
                "caption_mean_vs_x1": float(np.mean((caption_mean - x1) ** 2)),
                "global_mean_vs_x1": float(np.mean((global_mean - x1) ** 2)),
                "images_per_caption": float(np.mean([len(same[captions[i]]) for i in rows]))})
  return out
