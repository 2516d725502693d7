"""Samplers for the flow model: time grids, ODE solvers, DPM-Solver++ 2M and renorm-CFG.

Conventions (docs/reference.md §4): flow time t in [0, 1], t = 0 is noise and t = 1 is data,
x_t = t * x1 + (1 - t) * x0, and the model is a velocity field `velocity_fn(x, t) -> v` with
v ~ x1 - x0, x fp32 [B, ...] and t fp32 [B]. DPM-Solver works in the noise level s = sigma = 1 - t.

Every solver is one `lax.scan` over precomputed per-step constants, so a sampler traces the model
once (twice for midpoint / Heun) whatever the number of steps; the state is kept in fp32. The
solvers are plain traceable functions: wrap the call in `jax.jit` with the params as arguments
(a jit inside here would bake a closure's params into the program as constants).

Time grids and solver coefficients are host constants computed in float64 numpy from concrete
`steps` / `shift` and cast to fp32 once, which gives the correctly rounded grid that diffusers
uses (docs/equivalence/sampler.md §2.2).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]

SOLVERS = ("dpm", "euler", "midpoint", "heun")
CFG_MODES = ("renorm", "standard", "none")


# ------------------------------------------------------------------------------------------------
# Classifier-free guidance (official NextDiT.forward_with_cfg)
# ------------------------------------------------------------------------------------------------

def _per_sample_norm(x: jax.Array) -> jax.Array:
  """L2 norm over all non-batch axes, shaped to broadcast against x."""
  axes = tuple(range(1, x.ndim))
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True))


def standard_cfg(v_cond: jax.Array, v_uncond: jax.Array, scale) -> jax.Array:
  """Plain CFG: v_u + scale * (v_c - v_u)."""
  return v_uncond + scale * (v_cond - v_uncond)


def renorm_cfg(v_cond: jax.Array, v_uncond: jax.Array, scale, renorm=1.0) -> jax.Array:
  """CFG whose result is clipped per sample to `renorm * ||v_cond||` (renorm <= 0: plain CFG).

  v <- v * min(1, renorm * ||v_c|| / (||v|| + 1e-12)), norms over every non-batch axis.
  """
  if v_cond.shape != v_uncond.shape:
    raise ValueError(f"v_cond {v_cond.shape} and v_uncond {v_uncond.shape} differ in shape")
  if v_cond.ndim < 2:
    raise ValueError(f"CFG needs a batch axis plus data axes, got shape {v_cond.shape}")
  v = standard_cfg(v_cond, v_uncond, scale)
  renorm = jnp.asarray(renorm, jnp.float32)
  factor = jnp.minimum(1.0, renorm * _per_sample_norm(v_cond) / (_per_sample_norm(v) + 1e-12))
  # A traced renorm is allowed, so the switch is a select rather than a Python branch.
  factor = jnp.where(renorm > 0, factor, 1.0)
  return v * factor.astype(v.dtype)


def guided_velocity(model_fn: VelocityFn, mode: str = "renorm", scale=4.0, renorm=1.0,
                    cfg_trunc=None) -> VelocityFn:
  """Velocity fn with CFG from `model_fn(x2, t2)`, a model that sees the [cond; uncond] batch.

  `model_fn` is the conditional network closed over the text features stacked as
  [cond rows; uncond rows]. Cond and uncond run in ONE call on [x; x] (the same latent in both
  halves, as the official forward_with_cfg does). Modes: "renorm" (official default),
  "standard" (no clipping), "none" (cond half only, still one batched call so `model_fn` keeps
  one batch layout). `cfg_trunc`: samples with t >= cfg_trunc get v_cond (official default 100
  never truncates; None means the same).
  """
  if mode not in CFG_MODES:
    raise ValueError(f"unknown CFG mode {mode!r}; expected one of {CFG_MODES}")

  def velocity_fn(x: jax.Array, t: jax.Array) -> jax.Array:
    b = x.shape[0]
    out = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0))
    # Guidance in fp32 whatever the network's compute dtype (the solver state is fp32 too).
    out = out.astype(jnp.float32)
    if out.shape[0] != 2 * b:
      raise ValueError(f"model_fn returned batch {out.shape[0]} for a CFG batch of {2 * b}")
    v_cond, v_uncond = out[:b], out[b:]
    if mode == "none":
      return v_cond
    if mode == "standard":
      v = standard_cfg(v_cond, v_uncond, scale)
    else:
      v = renorm_cfg(v_cond, v_uncond, scale, renorm)
    if cfg_trunc is not None:
      keep = (t < cfg_trunc).reshape((b,) + (1,) * (v.ndim - 1))
      v = jnp.where(keep, v, v_cond)
    return v

  return velocity_fn


# ------------------------------------------------------------------------------------------------
# Time grids (host constants, float64)
# ------------------------------------------------------------------------------------------------

def _check_grid_args(steps, shift):
  if not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"steps must be a positive int, got {steps!r}")
  if not np.isfinite(shift) or shift <= 0:
    raise ValueError(f"shift must be a positive number, got {shift!r}")


def shift_sigma(sigma, shift):
  """SD3 / flow shift of a noise level: shift * s / (1 + (shift - 1) * s)."""
  return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def time_uniform_flow_sigmas(steps: int, shift: float = 10.0, t_end: float = 1e-3) -> np.ndarray:
  """The official DPM `time_uniform_flow` noise levels: steps + 1 values, float64, last exactly 0.

  b = linspace(1, t_end, N + 1); sigma = shift(1 - b); reversed. For N = 50, shift 10 the first
  level is 0.9998999 (not 1).
  """
  _check_grid_args(steps, shift)
  if not 0.0 < t_end < 1.0:
    raise ValueError(f"t_end must lie in (0, 1), got {t_end!r}")
  b = np.linspace(1.0, t_end, steps + 1, dtype=np.float64)
  return shift_sigma(1.0 - b, float(shift))[::-1].copy()


def ode_time_grid(num_points: int, shift: float = 1.0) -> np.ndarray:
  """Official `sample_ode` grid in model time: t = linspace(0, 1, n), t' = t / (t + s - s t)."""
  _check_grid_args(num_points, shift)
  if num_points < 2:
    raise ValueError(f"an ODE grid needs at least 2 points, got {num_points}")
  t = np.linspace(0.0, 1.0, num_points, dtype=np.float64)
  return t / (t + shift - shift * t)


def _concrete_grid(grid, name: str) -> np.ndarray:
  try:
    g = np.asarray(grid, dtype=np.float64)
  except (TypeError, jax.errors.ConcretizationTypeError,
          jax.errors.TracerArrayConversionError) as e:
    raise TypeError(f"{name} must be a concrete host array (numpy / list), not a traced "
                    "value") from e
  if g.ndim != 1 or g.shape[0] < 2:
    raise ValueError(f"{name} must be 1-D with at least 2 points, got shape {g.shape}")
  if not np.all(np.isfinite(g)):
    raise ValueError(f"{name} has non-finite values")
  return g


# ------------------------------------------------------------------------------------------------
# Solvers
# ------------------------------------------------------------------------------------------------

def _as_state(noise) -> jax.Array:
  x = jnp.asarray(noise)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"noise must be a floating array, got dtype {x.dtype}")
  if x.ndim < 1:
    raise ValueError(f"noise needs a batch axis, got shape {x.shape}")
  return x.astype(jnp.float32)


def _call(velocity_fn: VelocityFn, x: jax.Array, t) -> jax.Array:
  tb = jnp.full((x.shape[0],), t, dtype=jnp.float32)
  v = velocity_fn(x, tb)
  if v.shape != x.shape:
    raise ValueError(f"velocity_fn returned shape {v.shape} for a state of shape {x.shape}")
  return v.astype(jnp.float32)


def _f32(a) -> jax.Array:
  return jnp.asarray(np.asarray(a, dtype=np.float64).astype(np.float32))


def euler(velocity_fn: VelocityFn, noise, t_grid) -> jax.Array:
  """Explicit Euler on a model-time grid (torchdiffeq 'euler'): len(t_grid) - 1 evaluations."""
  t = _concrete_grid(t_grid, "t_grid")

  def step(x, c):
    tk, dt = c
    return x + dt * _call(velocity_fn, x, tk), None

  x, _ = jax.lax.scan(step, _as_state(noise), (_f32(t[:-1]), _f32(np.diff(t))))
  return x


def midpoint(velocity_fn: VelocityFn, noise, t_grid) -> jax.Array:
  """Explicit midpoint (torchdiffeq 'midpoint'): x + dt * v(x + dt/2 v(x, t), t + dt/2)."""
  t = _concrete_grid(t_grid, "t_grid")
  dt = np.diff(t)

  def step(x, c):
    tk, dtk, tmid = c
    k1 = _call(velocity_fn, x, tk)
    return x + dtk * _call(velocity_fn, x + (0.5 * dtk) * k1, tmid), None

  xs = (_f32(t[:-1]), _f32(dt), _f32(t[:-1] + 0.5 * dt))
  x, _ = jax.lax.scan(step, _as_state(noise), xs)
  return x


def heun(velocity_fn: VelocityFn, noise, t_grid) -> jax.Array:
  """Heun (explicit trapezoid) on every interval: x + dt/2 (v(x, t) + v(x + dt v, t + dt)).

  Unlike diffusers' FlowMatchHeunDiscreteScheduler it does not fall back to Euler on the last
  interval, so it evaluates the model at the grid's end time (t = 1 on a full grid).
  """
  t = _concrete_grid(t_grid, "t_grid")

  def step(x, c):
    tk, dtk, tn = c
    k1 = _call(velocity_fn, x, tk)
    k2 = _call(velocity_fn, x + dtk * k1, tn)
    return x + (0.5 * dtk) * (k1 + k2), None

  x, _ = jax.lax.scan(step, _as_state(noise), (_f32(t[:-1]), _f32(np.diff(t)), _f32(t[1:])))
  return x


def dpm_solver_pp_2m_coefficients(sigmas, lower_order_final: bool = True):
  """Per-step constants (a, b, c) of DPM-Solver++ 2M in data prediction, float64.

  Step i maps noise level sigmas[i] to sigmas[i+1]: x' = a x + b m + c (m - m_prev), with
  m = x + sigma_i v the data prediction, alpha = 1 - sigma, lambda = log(alpha / sigma),
  h = lambda_{i+1} - lambda_i, a = sigma_{i+1} / sigma_i, b = -alpha_{i+1} expm1(-h) and, on 2nd
  order steps, c = 0.5 b h / h_prev (the "dpmsolver" / diffusers "midpoint" correction).
  Step 0 is 1st order; so is the last step with `lower_order_final`, and any step to sigma = 0
  (lambda = +inf, expm1(-inf) = -1, so that step returns m exactly).
  """
  s = _concrete_grid(sigmas, "sigmas")
  if np.any(s[:-1] <= 0) or np.any(s > 1) or s[-1] < 0 or np.any(np.diff(s) >= 0):
    raise ValueError("sigmas must decrease strictly within (0, 1], ending at a level >= 0")
  n = s.shape[0] - 1
  alpha = 1.0 - s
  with np.errstate(divide="ignore"):
    lam = np.log(alpha) - np.log(s)  # +inf at sigma = 0, -inf at sigma = 1
  h = lam[1:] - lam[:-1]
  a = s[1:] / s[:-1]
  b = -alpha[1:] * np.expm1(-h)
  second = np.arange(n) >= 1
  if lower_order_final:
    second[-1] = False
  second &= s[1:] > 0
  c = np.zeros(n)
  idx = np.nonzero(second)[0]
  c[idx] = 0.5 * b[idx] * h[idx] / h[idx - 1]
  return a, b, c


def dpm_solver_pp_2m(velocity_fn: VelocityFn, noise, sigmas, lower_order_final: bool = True):
  """Multistep DPM-Solver++ (order 2) for a flow-velocity model: len(sigmas) - 1 evaluations.

  `sigmas` are noise levels s = 1 - t (e.g. `time_uniform_flow_sigmas`); the model sees
  t = 1 - sigma. The data prediction is computed as x + s v, which equals the official
  (x - s eps)/(1 - s) without its cancellation near s = 1.
  """
  s = _concrete_grid(sigmas, "sigmas")
  a, b, c = dpm_solver_pp_2m_coefficients(s, lower_order_final)
  x0 = _as_state(noise)

  def step(carry, k):
    x, m_prev = carry
    sk, tk, ak, bk, ck = k
    m = x + sk * _call(velocity_fn, x, tk)
    # c is 0 on 1st order steps; m_prev is then unused (0 at step 0).
    x = ak * x + bk * m + ck * (m - m_prev)
    return (x, m), None

  ks = (_f32(s[:-1]), _f32(1.0 - s[:-1]), _f32(a), _f32(b), _f32(c))
  (x, _), _ = jax.lax.scan(step, (x0, jnp.zeros_like(x0)), ks)
  return x


def sample(velocity_fn: VelocityFn, noise, *, solver: str = "dpm", steps: int = 50,
           shift: float = 10.0, t_end: float = 1e-3) -> jax.Array:
  """Integrate from noise (t = 0) to data (t = 1) with an official sampler.

  `steps` follows the official `--num_sampling_steps`: DPM-Solver++ 2M takes `steps` steps on
  `time_uniform_flow_sigmas(steps, shift, t_end)`; the ODE solvers ("euler", "midpoint", "heun")
  use `steps` grid points (steps - 1 intervals) of `ode_time_grid(steps, shift)`, as torchdiffeq
  on the official grid. `t_end` is used by DPM only.
  """
  if solver not in SOLVERS:
    raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
  if solver == "dpm":
    return dpm_solver_pp_2m(velocity_fn, noise, time_uniform_flow_sigmas(steps, shift, t_end))
  grid = ode_time_grid(steps, shift)
  return {"euler": euler, "midpoint": midpoint, "heun": heun}[solver](velocity_fn, noise, grid)


# ------------------------------------------------------------------------------------------------
# Seeds and initial noise (official eval: svg_generate.py)
# ------------------------------------------------------------------------------------------------

def eval_seed(prompt_index: int, k: int, images_per_prompt: int = 4) -> int:
  """Seed of image k of prompt i in the official benchmark generation: 42 + 4 i + k."""
  if not 0 <= k < images_per_prompt:
    raise ValueError(f"image index k={k} outside [0, {images_per_prompt})")
  if prompt_index < 0:
    raise ValueError(f"prompt_index must be >= 0, got {prompt_index}")
  return 42 + images_per_prompt * prompt_index + k


def initial_noise(seed, latent_shape) -> jax.Array:
  """Standard normal fp32 latent [h, w, C] from `jax.random.key(seed)` (jit- and vmap-able)."""
  shape = tuple(int(d) for d in latent_shape)
  if len(shape) != 3:
    raise ValueError(f"latent_shape must be [h, w, C], got {latent_shape}")
  return _normal_from_seed(seed, shape)


@functools.partial(jax.jit, static_argnums=1)
def _normal_from_seed(seed, shape):
  # One compiled program instead of the many small eager threefry ops.
  return jax.random.normal(jax.random.key(seed), shape, dtype=jnp.float32)


def initial_noise_batch(seeds, latent_shape) -> jax.Array:
  """[B, h, w, C] noise, row b equal to `initial_noise(seeds[b], latent_shape)`."""
  seeds = jnp.asarray(seeds)
  if seeds.ndim != 1:
    raise ValueError(f"seeds must be 1-D, got shape {seeds.shape}")
  return jax.vmap(lambda s: initial_noise(s, latent_shape))(seeds)
