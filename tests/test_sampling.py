"""Sampler parity: svg_jax.sampling vs diffusers' schedulers and the official reference numbers.

Everything runs on the analytic Gaussian-mixture flow field of docs/equivalence/sampler.md §5.1 (fp64,
returned as fp32), through `jax.pure_callback` on the JAX side so both sides see the same field.
Layout here is channels-last [B, H, W, C]; the doc's NCHW noise is transposed, and its "first 4
(C0, H0, W0..3)" are [0, 0, 0:4, 0] here.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from svg_jax import sampling as S

CFG_SCALE, RENORM = 4.0, 1.0
TOL_DPM_CFG, TOL_DPM_NOCFG, TOL_EULER = 1e-4, 1e-5, 5e-5


# ------------------------------------------------------------------------------------------------
# The analytic field (docs/equivalence/sampler.md §5.1)
# ------------------------------------------------------------------------------------------------

def _mixture(seed):
  rng = np.random.default_rng(seed)
  means = 1.5 * rng.standard_normal((3, 4))
  stds = rng.uniform(0.2, 0.6, 3)
  logits = rng.standard_normal(3)
  log_w = logits - (logits.max() + np.log(np.sum(np.exp(logits - logits.max()))))
  return means, stds, log_w


COND, UNCOND = _mixture(1), _mixture(2)


def gm_velocity(x, t, mix):
  """Exact velocity of the flow to an isotropic Gaussian mixture over the last axis, fp64."""
  means, stds, log_w = mix
  x = np.asarray(x, np.float64)
  t = np.asarray(t, np.float64).reshape((-1,) + (1,) * (x.ndim - 2) + (1,))  # [B, 1.., 1(K)]
  var = t**2 * stds**2 + (1 - t)**2
  diff = x[..., None, :] - t[..., None] * means  # [B, H, W, K, C]
  logits = log_w - 0.5 * np.sum(diff**2, -1) / var - 0.5 * x.shape[-1] * np.log(var)
  r = np.exp(logits - logits.max(-1, keepdims=True))
  r /= r.sum(-1, keepdims=True)
  coef = (t * stds**2 - (1 - t)) / var
  return np.einsum("...k,kc->...c", r, means) + np.einsum("...k,...kc->...c", r * coef, diff)


def np_cfg(vc, vu, dtype=np.float32):
  """Renorm-CFG written from docs/equivalence/sampler.md §4, independently of svg_jax."""
  vc, vu = vc.astype(dtype), vu.astype(dtype)
  g = vu + dtype(CFG_SCALE) * (vc - vu)
  nc = np.sqrt(np.sum(vc**2, axis=(1, 2, 3), keepdims=True))
  ng = np.sqrt(np.sum(g**2, axis=(1, 2, 3), keepdims=True))
  return g * np.minimum(dtype(1), dtype(RENORM) * nc / (ng + dtype(1e-12)))


def np_field(cfg, dtype=np.float32):
  """numpy velocity(x, t): the official model output (fp32 field values, CFG in the state dtype)."""
  if not cfg:
    return lambda x, t: gm_velocity(x, t, COND).astype(dtype)
  return lambda x, t: np_cfg(gm_velocity(x, t, COND).astype(dtype),
                             gm_velocity(x, t, UNCOND).astype(dtype), dtype)


def cfg_model_np(x2, t2):
  """The conditional 'network' on a [cond; uncond] batch."""
  b = x2.shape[0] // 2
  return np.concatenate([gm_velocity(x2[:b], t2[:b], COND),
                         gm_velocity(x2[b:], t2[b:], UNCOND)]).astype(np.float32)


def cfg_model_fn(x2, t2):
  return jax.pure_callback(cfg_model_np, jax.ShapeDtypeStruct(x2.shape, jnp.float32), x2, t2)


def cond_velocity_fn(x, t):
  return jax.pure_callback(lambda a, b: gm_velocity(a, b, COND).astype(np.float32),
                           jax.ShapeDtypeStruct(x.shape, jnp.float32), x, t)


GUIDED = S.guided_velocity(cfg_model_fn, "renorm", CFG_SCALE, RENORM)
NOISE = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).transpose(0, 2, 3, 1)


@functools.lru_cache(maxsize=None)
def run_jax(solver, steps, shift, cfg=True):
  vf = GUIDED if cfg else cond_velocity_fn
  fn = jax.jit(lambda n: S.sample(vf, n, solver=solver, steps=steps, shift=shift))
  return np.asarray(fn(jnp.asarray(NOISE, jnp.float32)))


def rk4_reference(f, x, grid):
  """fp64 classical RK4 on a model-time grid (the 'exact ODE' of docs/equivalence/sampler.md)."""
  x = np.asarray(x, np.float64)
  tb = lambda t: np.full(x.shape[0], t)
  for t0, t1 in zip(grid[:-1], grid[1:]):
    h = t1 - t0
    k1 = f(x, tb(t0))
    k2 = f(x + 0.5 * h * k1, tb(t0 + 0.5 * h))
    k3 = f(x + 0.5 * h * k2, tb(t0 + 0.5 * h))
    k4 = f(x + h * k3, tb(t1))
    x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
  return x


@functools.lru_cache(maxsize=None)
def exact_solution(cfg):
  f = np_field(cfg, np.float64)
  return rk4_reference(f, NOISE, S.ode_time_grid(1001, 10.0))


# ------------------------------------------------------------------------------------------------
# diffusers drivers (docs/equivalence/sampler.md §2.3, §3.2)
# ------------------------------------------------------------------------------------------------

DPM_SETTINGS = dict(num_train_timesteps=1000, use_flow_sigmas=True, flow_shift=10.0,
                    prediction_type="flow_prediction", algorithm_type="dpmsolver++",
                    solver_order=2, solver_type="midpoint", lower_order_final=True,
                    final_sigmas_type="zero")


def dpm_scheduler(steps=50, **overrides):
  sch = DPMSolverMultistepScheduler(**{**DPM_SETTINGS, **overrides})
  sch.set_timesteps(steps)
  sch.set_begin_index(0)
  return sch


def run_scheduler(sch, velocity, noise, int_time=False):
  """Official loop through a diffusers scheduler: model time 1 - sigma, model output -v."""
  x = torch.from_numpy(np.asarray(noise, np.float32))
  for i, ts in enumerate(sch.timesteps):
    t = 1.0 - ts.item() / 1000.0 if int_time else (1.0 - sch.sigmas[i]).item()
    v = velocity(x.numpy(), np.full(x.shape[0], t, np.float32))
    x = sch.step(-torch.from_numpy(v), ts, x).prev_sample
  return x.numpy()


def euler_scheduler(num_points, shift, explicit=True):
  sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
  if explicit:
    sch.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_points)[:-1])
  else:
    sch.set_timesteps(num_points)
  sch.set_begin_index(0)
  return sch


def maxabs(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ------------------------------------------------------------------------------------------------
# Grids
# ------------------------------------------------------------------------------------------------

def test_dpm_grid_matches_diffusers_and_reference_values():
  s = S.time_uniform_flow_sigmas(50, 10.0)
  ref = dpm_scheduler().sigmas.numpy()
  assert s.shape == ref.shape == (51,)
  assert maxabs(s.astype(np.float32), ref) <= 2e-7
  assert s[-1] == 0.0 and ref[-1] == 0.0
  # fp64 formula values of docs/equivalence/sampler.md §2.2.
  for i, v in {0: 0.999899909919, 1: 0.997861623169, 4: 0.991272385275,
               46: 0.464845749383, 49: 0.169347866624}.items():
    assert abs(s[i] - v) < 1e-11, (i, s[i], v)
  assert round(float(s[0]), 7) == 0.9998999
  # Model times of the official run (fp32): t = 1 - s.
  np.testing.assert_allclose(1 - s[[0, 1, 2, 49]],
                             [1.00135803e-4, 0.00213837624, 0.0042527914, 0.830651999], atol=2e-7)


def test_dpm_grid_other_shift_and_steps_match_diffusers():
  for steps, shift in [(20, 1.0), (30, 6.0)]:
    s = S.time_uniform_flow_sigmas(steps, shift).astype(np.float32)
    ref = dpm_scheduler(steps, flow_shift=shift).sigmas.numpy()
    assert maxabs(s, ref) <= 2e-7


def test_ode_grid_matches_official_and_diffusers():
  t10 = S.ode_time_grid(50, 10.0)
  assert t10[0] == 0.0 and t10[-1] == 1.0
  np.testing.assert_allclose(t10[[1, 2, 3, 4]], [0.00207900186, 0.00423728814, 0.00647948124,
                                                 0.00881057233], atol=1e-9)
  np.testing.assert_allclose(t10[[-5, -4, -3, -2]], [0.529411554, 0.605263114, 0.701492667,
                                                     0.827586591], atol=5e-7)
  assert abs(t10[1] - 0.002079002079) < 1e-12 and abs(t10[-2] - 0.827586206897) < 1e-12
  t6 = S.ode_time_grid(50, 6.0)
  np.testing.assert_allclose(t6[[1, 2, 3, -4, -3, -2]], [0.00346020749, 0.00704225339,
                             0.0107526882, 0.718750119, 0.796610236, 0.888888955], atol=5e-7)
  for shift in (10.0, 6.0):
    sch = euler_scheduler(50, shift)
    sig = sch.sigmas.numpy()
    assert sig.shape == (50,) and sig[-1] == 0.0
    assert maxabs(1 - S.ode_time_grid(50, shift)[:-1], sig[:-1]) <= 5e-7


def test_dpm_coefficients_step_orders():
  a, b, c = S.dpm_solver_pp_2m_coefficients(S.time_uniform_flow_sigmas(50, 10.0))
  assert c[0] == 0.0  # first step is 1st order
  assert np.all(c[1:-1] != 0.0)  # multistep 2nd order in between
  # Last step to sigma = 0: lambda = +inf, expm1(-inf) = -1, so x_50 is the data prediction.
  assert (a[-1], b[-1], c[-1]) == (0.0, 1.0, 0.0)


def test_dpm_last_step_returns_data_prediction():
  # One step: x1 = x + s0 * v(x, 1 - s0) exactly, v(x, t) = -2x + t.
  s0 = float(S.time_uniform_flow_sigmas(1, 10.0)[0])
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 3, 3, 2)), jnp.float32)
  got = S.sample(lambda x, t: -2 * x + t[:, None, None, None], x, solver="dpm", steps=1,
                 shift=10.0)
  want = np.asarray(x, np.float64) * (1 - 2 * s0) + s0 * (1 - s0)
  assert maxabs(got, want) < 1e-6


# ------------------------------------------------------------------------------------------------
# Trajectory parity with diffusers
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def diffusers_dpm(cfg, int_time=False, **overrides):
  return run_scheduler(dpm_scheduler(**overrides), np_field(cfg), NOISE, int_time=int_time)


def test_dpm_matches_diffusers_cfg_field():
  err = maxabs(run_jax("dpm", 50, 10.0), diffusers_dpm(True))
  print(f"DPM CFG field, JAX vs diffusers max abs {err:.3g}")
  assert err <= TOL_DPM_CFG


def test_dpm_matches_diffusers_nocfg_field():
  err = maxabs(run_jax("dpm", 50, 10.0, cfg=False), diffusers_dpm(False))
  print(f"DPM no-CFG field, JAX vs diffusers max abs {err:.3g}")
  assert err <= TOL_DPM_NOCFG


@pytest.mark.parametrize("wrong", [
    dict(solver_type="heun"),                 # the official "taylor" variant
    dict(int_time=True),                      # model time from truncated int timesteps
    dict(final_sigmas_type="sigma_min"),      # stops at sigma 0.01 with a noisy x
    dict(solver_order=1),
    dict(flow_shift=1.0),
], ids=lambda d: next(iter(d)))
def test_dpm_wrong_diffusers_settings_fail(wrong):
  err = maxabs(run_jax("dpm", 50, 10.0), diffusers_dpm(True, **wrong))
  print(f"wrong DPM setting {wrong}: max abs {err:.3g}")
  assert err > 100 * TOL_DPM_CFG


@pytest.mark.parametrize("steps,lower_order_final", [(50, False), (10, True)])
def test_dpm_non_zero_final_sigma_matches_diffusers(steps, lower_order_final):
  # Grids ending at sigma_min > 0 exercise the general update: diffusers takes a 2nd order last
  # step for >= 15 steps and a 1st order one (lower_order_final) below 15. No-CFG field: on the
  # CFG field both fp32 runs sit ~1.4e-4 from fp64, above the 1e-4 tolerance.
  sch = dpm_scheduler(steps, final_sigmas_type="sigma_min")
  sig = sch.sigmas.numpy().astype(np.float64)
  assert 0 < sig[-1] < 0.02
  ref = run_scheduler(sch, np_field(False), NOISE)
  run = lambda lof: np.asarray(jax.jit(lambda n: S.dpm_solver_pp_2m(
      cond_velocity_fn, n, sig, lower_order_final=lof))(NOISE))
  err = maxabs(run(lower_order_final), ref)
  print(f"DPM {steps} steps to sigma_min, JAX vs diffusers max abs {err:.3g}")
  assert err <= TOL_DPM_NOCFG
  assert maxabs(run(not lower_order_final), ref) > 100 * TOL_DPM_NOCFG


@pytest.mark.parametrize("name", ["dpm_cfg_fp64", "dpm_nocfg_fp64"])
def test_dpm_coefficients_reproduce_official_fp64_run(name):
  # The fp64 host constants, applied in an fp64 numpy loop, give the official fp64 numbers to
  # their printed precision: the step orders and the "dpmsolver" correction are the official ones.
  _, shift, cfg, total, l2, first4 = GOLDEN[name]
  sig = S.time_uniform_flow_sigmas(50, shift)
  a, b, c = S.dpm_solver_pp_2m_coefficients(sig)
  f = np_field(cfg, np.float64)
  x, m_prev = NOISE.copy(), np.zeros_like(NOISE)
  for i in range(50):
    m = x + sig[i] * f(x, np.full(1, 1.0 - sig[i]))
    x, m_prev = a[i] * x + b[i] * m + c[i] * (m - m_prev), m
  assert abs(x[0].sum() - total) < 1e-8 and abs(np.linalg.norm(x[0]) - l2) < 1e-8
  np.testing.assert_allclose(x[0, 0, 0:4, 0], first4, atol=1e-6)


@pytest.mark.parametrize("shift", [10.0, 6.0])
def test_euler_matches_diffusers_explicit_sigmas(shift):
  ref = run_scheduler(euler_scheduler(50, shift), np_field(True), NOISE)
  err = maxabs(run_jax("euler", 50, shift), ref)
  print(f"Euler shift {shift}, JAX vs diffusers max abs {err:.3g}")
  assert err <= TOL_EULER


@pytest.mark.parametrize("points", [49, 50])
def test_euler_default_diffusers_grid_fails(points):
  ref = run_scheduler(euler_scheduler(points, 10.0, explicit=False), np_field(True), NOISE)
  err = maxabs(run_jax("euler", 50, 10.0), ref)
  print(f"default diffusers Euler set_timesteps({points}): max abs {err:.3g}")
  assert err > 100 * TOL_EULER


# ------------------------------------------------------------------------------------------------
# Reference numbers from the official solver (docs/equivalence/sampler.md §5.3), torch-free
# ------------------------------------------------------------------------------------------------

GOLDEN = {
    # name: (solver, shift, cfg, sum, L2, first 4)
    "dpm_cfg_fp32": ("dpm", 10.0, True, -3.661608626, 19.734631035,
                     [-0.6940833, -0.7346229, -0.2476168, -0.7286283]),
    "dpm_cfg_fp64": ("dpm", 10.0, True, -3.661722634, 19.734628196,
                     [-0.694083, -0.7346226, -0.2476192, -0.7286279]),
    "dpm_nocfg_fp64": ("dpm", 10.0, False, 69.982830553, 18.661774742,
                       [1.1406413, 0.9426893, 0.764357, 1.0781789]),
    "euler_s10": ("euler", 10.0, True, -14.347336615, 19.194602230,
                  [-0.7367852, -0.7016305, -0.3916259, -0.8172969]),
    "euler_s6": ("euler", 6.0, True, -8.450605437, 19.678189283,
                 [-0.7475865, -0.735633, -0.3644348, -0.805171]),
    "midpoint_s10": ("midpoint", 10.0, True, -18.674269198, 19.740360548,
                     [-0.7474684, -0.7441123, -0.2600296, -0.783733]),
    "midpoint_s6": ("midpoint", 6.0, True, -11.891140642, 20.100050805,
                    [-0.7476597, -0.7467396, -0.391129, -0.8040434]),
}
EXACT = (-8.160065517, 20.259227724, [-0.7540094, -0.7485485, -0.3493463, -0.8143641])


def _check_golden(y, total, l2, first4):
  y = np.asarray(y, np.float64)
  assert abs(y.sum() - total) <= 1e-3, (y.sum(), total)
  assert abs(np.linalg.norm(y) - l2) <= 1e-4, (np.linalg.norm(y), l2)
  np.testing.assert_allclose(y[0, 0:4, 0], first4, atol=1e-4)


@pytest.mark.parametrize("name", list(GOLDEN))
def test_official_reference_numbers(name):
  solver, shift, cfg, total, l2, first4 = GOLDEN[name]
  _check_golden(run_jax(solver, 50, shift, cfg)[0], total, l2, first4)


def test_exact_solution_reference_and_discretisation_gaps():
  exact = exact_solution(True)
  _check_golden(exact[0], *EXACT)  # validates the field itself against the official harness
  # Distances to the exact ODE solution quoted in docs/equivalence/sampler.md (§2.4, §3.2).
  for solver, shift, gap in [("dpm", 10.0, 0.39), ("euler", 10.0, 0.90), ("euler", 6.0, 0.90),
                             ("midpoint", 10.0, 0.29), ("midpoint", 6.0, 0.14)]:
    assert round(maxabs(run_jax(solver, 50, shift), exact), 2) == gap, (solver, shift)


# ------------------------------------------------------------------------------------------------
# Convergence order (no-CFG field: smooth, unlike the min() of renorm-CFG)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver,order", [("euler", 1), ("midpoint", 2), ("heun", 2)])
def test_convergence_order(solver, order):
  ref = rk4_reference(np_field(False, np.float64), NOISE, S.ode_time_grid(2001, 10.0))
  # 48, 96, 192 intervals on the shift-10 grid.
  errs = np.array([maxabs(run_jax(solver, n, 10.0, cfg=False), ref) for n in (49, 97, 193)])
  ratios = errs[:-1] / errs[1:]
  print(f"{solver}: errors {errs}, ratios {ratios}")
  lo, hi = (1.8, 2.2) if order == 1 else (3.4, 4.6)
  assert np.all((ratios > lo) & (ratios < hi)), ratios


# ------------------------------------------------------------------------------------------------
# CFG
# ------------------------------------------------------------------------------------------------

def test_renorm_cfg_hand_values():
  # Shapes [2, 2, 1, 2]: the norm runs over all of (H, W, C) per sample.
  vc = np.array([[[[3.0, 0.0]], [[0.0, 4.0]]],      # ||c|| = 5
                 [[[3.0, 0.0]], [[0.0, 4.0]]]], np.float32)
  vu = np.array([[[[1.0, 0.0]], [[0.0, 0.0]]],      # g = (9, 0, 0, 16): ||g|| = sqrt(337) > 5
                 [[[3.5, 0.0]], [[0.0, 4.5]]]], np.float32)
  # Sample 0, scale 4: g = u + 4 (c - u) = (9, 0, 0, 16), clipped to norm 5.
  # Sample 1, scale 4: g = (1.5, 0, 0, 2.5), norm sqrt(8.5) < 5, untouched.
  got = np.asarray(S.renorm_cfg(jnp.asarray(vc), jnp.asarray(vu), 4.0, 1.0))
  want0 = np.array([9.0, 0.0, 0.0, 16.0]) * 5.0 / np.sqrt(337.0)
  want1 = np.array([1.5, 0.0, 0.0, 2.5])
  np.testing.assert_allclose(got[0].ravel(), want0, rtol=1e-6)
  np.testing.assert_allclose(got[1].ravel(), want1, rtol=1e-6)
  assert abs(np.linalg.norm(got[0]) - 5.0) < 1e-5
  # renorm 0.5: both clipped to 2.5; renorm 0 (or < 0): plain CFG.
  half = np.asarray(S.renorm_cfg(jnp.asarray(vc), jnp.asarray(vu), 4.0, 0.5))
  np.testing.assert_allclose(np.linalg.norm(half.reshape(2, -1), axis=1), [2.5, 2.5], rtol=1e-6)
  for r in (0.0, -1.0):
    plain = np.asarray(S.renorm_cfg(jnp.asarray(vc), jnp.asarray(vu), 4.0, r))
    np.testing.assert_allclose(plain[0].ravel(), [9.0, 0.0, 0.0, 16.0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(S.standard_cfg(jnp.asarray(vc), jnp.asarray(vu), 4.0))
                             [0].ravel(), [9.0, 0.0, 0.0, 16.0], rtol=1e-6)
  # The 1e-12 keeps a zero guided velocity finite: u = 2c, scale 2 -> g = 0.
  zero = np.asarray(S.renorm_cfg(jnp.asarray(vc), jnp.asarray(2 * vc), 2.0, 1.0))
  assert np.all(np.isfinite(zero)) and np.all(zero == 0)
  # Same as the independent numpy statement on random inputs, with the clip active somewhere.
  rng = np.random.default_rng(5)
  c, u = rng.standard_normal((2, 6, 2, 3, 4)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(S.renorm_cfg(jnp.asarray(c), jnp.asarray(u), CFG_SCALE)),
                             np_cfg(c, u), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="differ in shape"):
    S.renorm_cfg(jnp.zeros((2, 3)), jnp.zeros((2, 4)), 4.0)


def test_guided_velocity_one_batched_call_with_identical_halves():
  calls = []

  def model(x2, t2):
    calls.append((np.asarray(x2), np.asarray(t2)))
    return cfg_model_np(np.asarray(x2), np.asarray(t2))

  x = np.random.default_rng(7).standard_normal((3, 8, 8, 4)).astype(np.float32)
  t = np.array([0.1, 0.5, 0.9], np.float32)
  for mode in ("renorm", "standard", "none"):
    calls.clear()
    vf = S.guided_velocity(model, mode, CFG_SCALE, RENORM)
    v = np.asarray(vf(jnp.asarray(x), jnp.asarray(t)))
    assert len(calls) == 1
    x2, t2 = calls[0]
    assert x2.shape == (6, 8, 8, 4)
    np.testing.assert_array_equal(x2[:3], x)
    np.testing.assert_array_equal(x2[3:], x)
    np.testing.assert_array_equal(t2, np.concatenate([t, t]))
    vc = gm_velocity(x, t, COND).astype(np.float32)
    vu = gm_velocity(x, t, UNCOND).astype(np.float32)
    want = {"renorm": np_cfg(vc, vu), "none": vc,
            "standard": vu + np.float32(CFG_SCALE) * (vc - vu)}[mode]
    np.testing.assert_allclose(v, want, rtol=1e-5, atol=1e-5)
  # cfg_trunc: samples at t >= trunc fall back to v_cond.
  v = np.asarray(S.guided_velocity(model, "renorm", CFG_SCALE, RENORM, cfg_trunc=0.5)(x, t))
  np.testing.assert_allclose(v[1:], gm_velocity(x[1:], t[1:], COND), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(v[:1], np_cfg(vc, vu)[:1], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="unknown CFG mode"):
    S.guided_velocity(model, "lumina")


# ------------------------------------------------------------------------------------------------
# jit / batching / seeds / errors
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("solver,evals", [("dpm", 1), ("euler", 1), ("midpoint", 2), ("heun", 2)])
def test_one_traced_loop(solver, evals):
  traces = []

  def vf(x, t):
    traces.append(1)
    return -x

  jaxpr = jax.make_jaxpr(lambda n: S.sample(vf, n, solver=solver, steps=50, shift=10.0))(
      jnp.zeros((2, 4, 4, 3)))
  assert len(traces) == evals  # the model is traced once per stage, not once per step
  assert [e.primitive.name for e in jaxpr.eqns].count("scan") == 1


def test_batch_independence_under_jit():
  rng = np.random.default_rng(11)
  noise = np.concatenate([NOISE, rng.standard_normal((2, 8, 8, 4))]).astype(np.float32)
  fn = jax.jit(lambda n: S.sample(GUIDED, n, solver="dpm", steps=20, shift=10.0))
  full = np.asarray(fn(noise))
  for i in range(3):
    assert maxabs(full[i:i + 1], fn(noise[i:i + 1])) < 1e-6


def test_eval_seeds_and_noise():
  assert [S.eval_seed(0, k) for k in range(4)] == [42, 43, 44, 45]
  assert S.eval_seed(3, 2) == 56 and S.eval_seed(1064, 3) == 42 + 4 * 1064 + 3
  with pytest.raises(ValueError):
    S.eval_seed(0, 4)
  shape = (32, 32, 16)
  a = np.asarray(S.initial_noise(42, shape))
  assert a.shape == shape and a.dtype == np.float32
  np.testing.assert_array_equal(a, S.initial_noise(42, shape))
  assert not np.array_equal(a, S.initial_noise(43, shape))
  assert abs(a.mean()) < 0.03 and abs(a.std() - 1) < 0.03
  seeds = [S.eval_seed(2, k) for k in range(4)]
  batch = np.asarray(S.initial_noise_batch(jnp.array(seeds), shape))
  for k, s in enumerate(seeds):
    np.testing.assert_array_equal(batch[k], S.initial_noise(s, shape))
  with pytest.raises(ValueError, match=r"\[h, w, C\]"):
    S.initial_noise(0, (4, 4))


def test_bad_arguments_are_named():
  x = jnp.zeros((1, 2, 2, 3))
  with pytest.raises(ValueError, match="unknown solver"):
    S.sample(lambda x, t: x, x, solver="dopri5")
  with pytest.raises(ValueError, match="steps"):
    S.sample(lambda x, t: x, x, steps=0)
  with pytest.raises(ValueError, match="shape"):
    S.sample(lambda x, t: x[..., :1], x, solver="euler", steps=3)
  with pytest.raises(ValueError, match="decrease"):
    S.dpm_solver_pp_2m(lambda x, t: x, x, [0.5, 0.8, 0.0])
  with pytest.raises(TypeError, match="concrete"):
    jax.jit(lambda g: S.euler(lambda x, t: x, x, g))(jnp.linspace(0, 1, 5))


def test_sharded_batch_matches_single_device():
  # The [x; x] CFG concat and per-sample renorm must not mix samples when the batch is sharded.
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  w = jnp.asarray(np.random.default_rng(2).standard_normal((4, 4)) * 0.5, jnp.float32)

  def model(x2, t2):  # rows [cond; uncond] get different "text" offsets
    b = x2.shape[0] // 2
    off = jnp.concatenate([jnp.ones((b,)), -jnp.ones((b,))])[:, None, None, None]
    return jnp.tanh(x2 @ w) * (1 - t2[:, None, None, None]) + off - x2

  vf = S.guided_velocity(model, "renorm", CFG_SCALE, RENORM)
  noise = jnp.asarray(np.random.default_rng(4).standard_normal((8, 4, 4, 4)), jnp.float32)
  fn = jax.jit(lambda n: S.sample(vf, n, solver="dpm", steps=10, shift=10.0))
  ref = np.asarray(fn(noise))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  out = fn(jax.device_put(noise, sharding))
  assert maxabs(out, ref) < 1e-5
  assert maxabs(out[3:4], fn(noise[3:4])) < 1e-5
