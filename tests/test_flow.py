"""Flow-matching pieces against the reference numbers (docs/reference.md §4.1-4.2), diffusers' shift helpers,
torch's MSE and closed forms of the logit-normal distribution."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from svg_jax import flow


@pytest.fixture(scope="module")
def diffusers_refs():
  # The Flux pipeline module holds diffusers' own mu(seq_len); the scheduler holds its time shift.
  from diffusers import FlowMatchEulerDiscreteScheduler
  from diffusers.pipelines.flux.pipeline_flux import calculate_shift
  return calculate_shift, FlowMatchEulerDiscreteScheduler


def _phi(z):
  return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _logit(p):
  return math.log(p / (1.0 - p))


# (image side, tokens, mu, e^mu) from docs/reference.md §4.2; mu at 512 is 0.5 + 0.65 * 768 / 3840 = 0.63.
REFERENCE_SHIFTS = [(256, 256, 0.5, 1.6487), (512, 1024, 0.63, 1.8776), (1024, 4096, 1.15, 3.1582)]


@pytest.mark.parametrize("side,tokens,mu,factor", REFERENCE_SHIFTS)
def test_resolution_shift_reference_numbers(side, tokens, mu, factor, diffusers_refs):
  calculate_shift, _ = diffusers_refs
  assert (side // 16) ** 2 == tokens
  assert flow.resolution_shift_mu(tokens) == pytest.approx(mu, abs=1e-12)
  assert flow.shift_factor_for_seq_len(tokens) == pytest.approx(factor, abs=5e-5)
  # diffusers' Flux/SD3 line uses the same two points (256 -> 0.5, 4096 -> 1.15).
  assert flow.resolution_shift_mu(tokens) == pytest.approx(calculate_shift(tokens), abs=1e-12)


def test_resolution_shift_mu_is_linear_in_tokens(diffusers_refs):
  calculate_shift, _ = diffusers_refs
  seq = np.array([1, 64, 256, 700, 1024, 2304, 4096, 8192], np.float64)
  np.testing.assert_allclose(flow.resolution_shift_mu(seq), [calculate_shift(s) for s in seq],
                             rtol=0, atol=1e-12)


def test_shift_matches_sigma_formula_and_diffusers(diffusers_refs):
  _, scheduler_cls = diffusers_refs
  sched = scheduler_cls(use_dynamic_shifting=True)
  t = np.linspace(0.0, 1.0, 101)
  for mu in (0.5, 0.63, 1.15, math.log(10.0)):
    f = math.exp(mu)
    got = np.asarray(flow.shift_timesteps(jnp.asarray(t, jnp.float32), f), np.float64)
    # docs/reference.md §4.2 written out in float64: sigma = 1 - t, sigma' = f s / (f s + 1 - s).
    sigma = 1.0 - t
    want = 1.0 - f * sigma / (f * sigma + 1.0 - sigma)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-7)
    # diffusers shifts sigma with e^mu / (e^mu + (1/sigma - 1)); skip sigma = 0 (1/0 there).
    inner = sigma[sigma > 0]
    sig_shifted = sched.time_shift(mu, 1.0, torch.tensor(inner, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got[sigma > 0], 1.0 - sig_shifted, rtol=0, atol=2e-7)
    # Direction: strictly noisier inside (0, 1), fixed endpoints.
    assert np.all(got[1:-1] < t[1:-1])
    assert got[0] == 0.0 and got[-1] == 1.0


def test_interpolate_endpoints_velocity_and_diffusers_scale_noise(diffusers_refs):
  _, scheduler_cls = diffusers_refs
  k0, k1 = jax.random.split(jax.random.PRNGKey(0))
  x0 = jax.random.normal(k0, (3, 4, 5, 6))
  x1 = jax.random.normal(k1, (3, 4, 5, 6))
  xt, u = flow.interpolate(x0, x1, jnp.array([0.0, 1.0, 0.25]))
  np.testing.assert_array_equal(xt[0], x0[0])  # t = 0 is noise
  np.testing.assert_array_equal(xt[1], x1[1])  # t = 1 is data
  # Velocity target is the time derivative of the path (central difference, exact for a line).
  t = jnp.array([0.3, 0.6, 0.9])
  h = 1e-2
  d = (flow.interpolate(x0, x1, t + h)[0] - flow.interpolate(x0, x1, t - h)[0]) / (2 * h)
  np.testing.assert_allclose(d, flow.interpolate(x0, x1, t)[1], atol=1e-4)
  np.testing.assert_array_equal(u, x1 - x0)
  # diffusers' flow-matching forward process: x = sigma noise + (1 - sigma) sample, t = 1 - sigma.
  sched = scheduler_cls()
  sched.set_timesteps(num_inference_steps=7)
  n, s = np.array(x0[:1], np.float32), np.array(x1[:1], np.float32)
  for i in (0, 3, 6):
    ref = sched.scale_noise(torch.from_numpy(s), sched.timesteps[i:i + 1], torch.from_numpy(n))
    t_i = 1.0 - float(sched.sigmas[i])
    got = flow.interpolate(jnp.asarray(n), jnp.asarray(s), jnp.array([t_i]))[0]
    np.testing.assert_allclose(np.asarray(got), ref.numpy(), rtol=0, atol=1e-6)


def test_interpolate_rejects_bad_shapes():
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="noise shape"):
    flow.interpolate(x, jnp.zeros((2, 4)), jnp.zeros(2))
  with pytest.raises(ValueError, match="does not match"):
    flow.interpolate(x, x, jnp.zeros(3))


def test_logit_normal_against_closed_forms():
  n = 400_000
  t32 = flow.sample_timesteps(jax.random.PRNGKey(1), n)
  assert t32.dtype == jnp.float32 and t32.shape == (n,)
  t = np.asarray(t32, np.float64)
  assert np.all((t > 0) & (t < 1))
  # logit(t) ~ N(0, 1): its first two moments, and the symmetric law has mean t = 1/2.
  z = np.log(t / (1 - t))
  se = 1.0 / math.sqrt(n)
  assert abs(z.mean()) < 5 * se
  assert abs(z.std() - 1.0) < 5 * se
  assert abs(t.mean() - 0.5) < 5 * 0.21 * se
  # CDF of the logit-normal: P(t <= q) = Phi((logit q - m) / s). Kolmogorov-style bound.
  for q in (0.05, 0.2, 0.5, 0.7, 0.95):
    assert abs(np.mean(t <= q) - _phi(_logit(q))) < 5 * 0.5 * se
  # Non-zero mean/std.
  m, s = 0.7, 0.5
  t2 = np.asarray(flow.sample_timesteps(jax.random.PRNGKey(2), n, mean=m, std=s), np.float64)
  z2 = np.log(t2 / (1 - t2))
  assert abs(z2.mean() - m) < 5 * s * se and abs(z2.std() - s) < 5 * s * se
  assert abs(np.median(t2) - 1 / (1 + math.exp(-m))) < 5e-3
  for q in (0.3, 0.6, 0.8):
    assert abs(np.mean(t2 <= q) - _phi((_logit(q) - m) / s)) < 5 * 0.5 * se


def test_shifted_logit_normal_cdf_and_direction():
  n = 400_000
  f = flow.shift_factor_for_seq_len(4096)
  rng = jax.random.PRNGKey(3)
  t = np.asarray(flow.sample_timesteps(rng, n), np.float64)
  ts = np.asarray(flow.sample_timesteps(rng, n, shift_factor=f), np.float64)
  # Same draws shifted: every sample moves toward noise.
  assert np.all(ts <= t) and np.mean(ts < t) > 0.999
  # P(t' <= q) = P(t <= q f / (1 - q + q f)), the inverse of the shift, then the logit-normal CDF.
  se = 1.0 / math.sqrt(n)
  for q in (0.1, 0.3, 0.5, 0.8):
    q_unshifted = q * f / (1 - q + q * f)
    assert abs(np.mean(ts <= q) - _phi(_logit(q_unshifted))) < 5 * 0.5 * se
  assert ts.mean() < 0.5 - 0.1  # at factor 3.16 the mean time is well on the noisy side


def test_uniform_moments_and_bad_kind():
  n = 200_000
  t = np.asarray(flow.sample_timesteps(jax.random.PRNGKey(4), n, kind="uniform"), np.float64)
  se = 1.0 / math.sqrt(n)
  assert abs(t.mean() - 0.5) < 5 * math.sqrt(1 / 12) * se
  assert abs(t.var() - 1 / 12) < 5 * 0.075 * se
  assert abs(np.mean(t <= 0.3) - 0.3) < 5 * 0.5 * se
  with pytest.raises(ValueError, match="unknown timestep distribution 'cosine'"):
    flow.sample_timesteps(jax.random.PRNGKey(0), 4, kind="cosine")


def test_sample_timesteps_jits_and_is_deterministic():
  factor = flow.shift_factor_for_seq_len(256)
  fn = jax.jit(lambda r: flow.sample_timesteps(r, 8, shift_factor=factor))
  a, b = fn(jax.random.PRNGKey(5)), fn(jax.random.PRNGKey(5))
  assert a.dtype == jnp.float32 and a.shape == (8,)
  np.testing.assert_array_equal(a, b)


def test_loss_matches_torch_mse():
  ks = jax.random.split(jax.random.PRNGKey(6), 3)
  shape = (4, 3, 5, 7)
  v, x0, x1 = (jax.random.normal(k, shape) for k in ks)
  loss, per = flow.flow_matching_loss(v, x0, x1)
  tv, t0, t1 = (torch.from_numpy(np.asarray(a, np.float64)) for a in (v, x0, x1))
  ref_per = torch.nn.functional.mse_loss(tv, t1 - t0, reduction="none").mean(dim=(1, 2, 3))
  ref = torch.nn.functional.mse_loss(tv, t1 - t0)
  np.testing.assert_allclose(np.asarray(per), ref_per.numpy(), rtol=1e-6)
  np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-6)
  # bf16 inputs are upcast: same as torch on the upcast values.
  vb, x0b, x1b = (a.astype(jnp.bfloat16) for a in (v, x0, x1))
  loss_b, _ = flow.flow_matching_loss(vb, x0b, x1b)
  tb = [torch.from_numpy(np.asarray(a.astype(jnp.float32), np.float64)) for a in (vb, x0b, x1b)]
  assert loss_b.dtype == jnp.float32
  np.testing.assert_allclose(
      float(loss_b), torch.nn.functional.mse_loss(tb[0], tb[2] - tb[1]).item(), rtol=1e-6)


def test_loss_masks():
  ks = jax.random.split(jax.random.PRNGKey(7), 3)
  shape = (3, 4, 4, 2)
  v, x0, x1 = (jax.random.normal(k, shape) for k in ks)
  err = np.square(np.asarray(v) - (np.asarray(x1) - np.asarray(x0))).astype(np.float64)
  # Sample mask: ignored samples get 0 and leave the batch mean.
  loss, per = flow.flow_matching_loss(v, x0, x1, mask=jnp.array([1.0, 0.0, 1.0]))
  np.testing.assert_allclose(per, [err[0].mean(), 0.0, err[2].mean()], rtol=1e-6)
  np.testing.assert_allclose(loss, (err[0].mean() + err[2].mean()) / 2, rtol=1e-6)
  # Token mask [b, h, w]: mean over the valid tokens' channels only.
  tok = np.zeros((3, 4, 4), np.float32)
  tok[0, :2] = 1
  tok[1] = 1
  tok[2, :, :1] = 1
  loss, per = flow.flow_matching_loss(v, x0, x1, mask=jnp.asarray(tok))
  want = [err[i][tok[i] > 0].mean() for i in range(3)]
  np.testing.assert_allclose(per, want, rtol=1e-6)
  np.testing.assert_allclose(loss, np.mean(want), rtol=1e-6)
  with pytest.raises(ValueError, match="shapes differ"):
    flow.flow_matching_loss(v, x0, x1[:2])
