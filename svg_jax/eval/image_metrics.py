"""Reconstruction quality: PSNR and SSIM of images, as `launch/reconstruct.py` and the decoder's
held-out evaluation report them.

SSIM is the standard one of Wang et al. (2004): per channel, Gaussian window 11x11 with sigma 1.5,
K1 0.01, K2 0.03, population (co)variances, averaged over the windows that fit inside the image
(equal to skimage's `structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)`), then over channels.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def psnr(a: Any, b: Any, data_range: float = 255.0) -> float:
  """Peak signal-to-noise ratio in dB over all pixels and channels (inf for equal images)."""
  a, b = _pair(a, b)
  mse = float(np.mean((a - b) ** 2))
  return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


SSIM_WINDOW = 11  # pixels; images smaller than the window have no SSIM


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = 1.5) -> np.ndarray:
  """Normalized 1-D Gaussian taps (the 2-D window is their outer product)."""
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2
  g = np.exp(-0.5 * (x / sigma) ** 2)
  return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
  """Separable 'valid' correlation of [H, W, C] with g along H and W."""
  k = g.shape[0]
  x = np.lib.stride_tricks.sliding_window_view(x, k, axis=0) @ g
  return np.lib.stride_tricks.sliding_window_view(x, k, axis=1) @ g


def ssim(a: Any, b: Any, data_range: float = 255.0, win_size: int = SSIM_WINDOW,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
  """Mean SSIM of two images [H, W] or [H, W, C] (see the module docstring)."""
  a, b = _pair(a, b)
  if a.ndim == 2:
    a, b = a[..., None], b[..., None]
  if min(a.shape[:2]) < win_size:
    raise ValueError(f"SSIM needs images of at least {win_size}x{win_size}, got {a.shape[:2]}")
  g = gaussian_window(win_size, sigma)
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
  var_a = _filter_valid(a * a, g) - mu_a ** 2
  var_b = _filter_valid(b * b, g) - mu_b ** 2
  cov = _filter_valid(a * b, g) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) *
                                                   (var_a + var_b + c2))
  return float(s.mean())


def _pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
  return a, b
