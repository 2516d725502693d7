"""Rectified-flow training: the linear path, timestep sampling with the resolution shift, the loss.

Conventions follow the official SVG-T2I transport (docs/reference.md §4.1-4.2): t = 0 is noise, t = 1 is
data, x_t = t * x1 + (1 - t) * x0 and the model regresses the velocity u = x1 - x0 with an
unweighted per-sample MSE. Training t is logit-normal (t = sigmoid(u), u ~ N(mean, std)) and is then
shifted toward noise by the SD3/Flux shift with factor e^mu, mu linear in the token count through
(256 -> 0.5) and (4096 -> 1.15). Everything here is pure jax and jit-friendly.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# The two points of the official resolution-shift line: (tokens, mu).
SHIFT_BASE_SEQ_LEN = 256
SHIFT_BASE_MU = 0.5
SHIFT_MAX_SEQ_LEN = 4096
SHIFT_MAX_MU = 1.15

TIMESTEP_KINDS = ("logit_normal", "uniform")


def _expand_like(t: jax.Array, x: jax.Array) -> jax.Array:
  """Right-pads t's shape with unit axes so that it broadcasts over x's trailing axes."""
  t = jnp.asarray(t)
  if t.ndim > x.ndim or x.shape[:t.ndim] != t.shape:
    raise ValueError(f"t of shape {t.shape} does not match the leading axes of x {x.shape}")
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(x0_noise: jax.Array, x1_data: jax.Array,
                t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The linear path point and its velocity target.

  Args:
    x0_noise: noise sample, [b, ...].
    x1_data: data sample (normalized latent), same shape.
    t: [b] (or a scalar) times in [0, 1]; t = 0 gives pure noise, t = 1 the data.
  Returns:
    (x_t, u) with x_t = t * x1 + (1 - t) * x0 and u = d x_t / dt = x1 - x0.
  """
  if x0_noise.shape != x1_data.shape:
    raise ValueError(f"noise shape {x0_noise.shape} != data shape {x1_data.shape}")
  tb = _expand_like(t, x1_data)
  x_t = tb * x1_data + (1.0 - tb) * x0_noise
  return x_t, x1_data - x0_noise


def resolution_shift_mu(seq_len):
  """mu of the resolution shift: linear in the image token count through (256, 0.5), (4096, 1.15).

  The official trainer evaluates it at the nominal resolution's token count (train_res / 16)^2,
  not at the actual bucket's. Works on python numbers and arrays.
  """
  slope = (SHIFT_MAX_MU - SHIFT_BASE_MU) / (SHIFT_MAX_SEQ_LEN - SHIFT_BASE_SEQ_LEN)
  return SHIFT_BASE_MU + slope * (seq_len - SHIFT_BASE_SEQ_LEN)


def shift_factor_for_seq_len(seq_len: int) -> float:
  """The shift factor e^mu used at training for a nominal image token count."""
  return math.exp(resolution_shift_mu(seq_len))


def shift_timesteps(t: jax.Array, factor) -> jax.Array:
  """SD3/Flux time shift in the t = 1 data convention; factor > 1 moves t toward noise (t' < t).

  With sigma = 1 - t: sigma' = f * sigma / (f * sigma + 1 - sigma), t' = 1 - sigma'. The form used
  below, t' = t / (t + f * (1 - t)), is the same expression and is exact at t = 0 and t = 1.
  """
  t = jnp.asarray(t)
  return t / (t + factor * (1.0 - t))


def sample_timesteps(rng: jax.Array, batch: int, kind: str = "logit_normal", mean: float = 0.0,
                     std: float = 1.0, shift_factor: float | None = None) -> jax.Array:
  """Training times t in [0, 1], shape [batch], float32.

  kind: "logit_normal" (t = sigmoid(mean + std * n), n ~ N(0, 1); the official `lognorm` with mu 0
  uses mean 0, std 1) or "uniform" (t ~ U[0, 1)). shift_factor: when given (e^mu from
  `shift_factor_for_seq_len`), t is shifted toward noise with `shift_timesteps`.
  """
  if kind == "logit_normal":
    t = jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,), jnp.float32))
  elif kind == "uniform":
    t = jax.random.uniform(rng, (batch,), jnp.float32)
  else:
    raise ValueError(f"unknown timestep distribution {kind!r}; expected one of {TIMESTEP_KINDS}")
  if shift_factor is not None:
    t = shift_timesteps(t, shift_factor)
  return t


def flow_matching_loss(velocity_pred: jax.Array, x0: jax.Array, x1: jax.Array,
                       mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Unweighted velocity MSE (docs/reference.md §4.1), computed in float32.

  Args:
    velocity_pred: model output v(x_t, t), [b, ...].
    x0, x1: the noise and data used to build x_t.
    mask: optional weights broadcastable to the error after right-padding its shape with unit
      axes: [b] marks whole samples valid (1) or ignored (0), [b, h, w] masks tokens, the full shape
      masks elements. A sample's loss is its masked mean; samples with no valid element get loss 0
      and do not count in the batch mean.
  Returns:
    (loss, per_sample): per_sample [b] is the mean over all non-batch axes of (v - (x1 - x0))^2
    and loss is the mean over the (valid) samples.
  """
  if not velocity_pred.shape == x0.shape == x1.shape:
    raise ValueError(
        f"shapes differ: prediction {velocity_pred.shape}, x0 {x0.shape}, x1 {x1.shape}")
  err = jnp.square(velocity_pred.astype(jnp.float32)
                   - (x1.astype(jnp.float32) - x0.astype(jnp.float32)))
  axes = tuple(range(1, err.ndim))
  if mask is None:
    per_sample = jnp.mean(err, axis=axes)
    return jnp.mean(per_sample), per_sample
  m = _expand_like(jnp.asarray(mask, jnp.float32), err)
  m = jnp.broadcast_to(m, err.shape)
  count = jnp.sum(m, axis=axes)
  per_sample = jnp.sum(err * m, axis=axes) / jnp.maximum(count, 1.0)
  valid = (count > 0).astype(jnp.float32)
  loss = jnp.sum(per_sample * valid) / jnp.maximum(jnp.sum(valid), 1.0)
  return loss, per_sample
