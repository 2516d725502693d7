"""Parity of our NextDiT with diffusers' Lumina2Transformer2DModel aligned to the official model.

Weights are random everywhere (adaLN and final layers included) and travel through the one key map in
svg_jax/convert/nextdit.py. Tolerance 1e-5 abs on valid tokens (fp32); the negative controls are the
two layout conventions a static-shape port must get right plus a key-map bug, each must fail.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nextdit_reference as ref
from svg_jax.convert import nextdit as convert
from svg_jax.models import layers
from svg_jax.models import nextdit
from svg_jax.models.nextdit import NextDiT, NextDiTConfig

TOL = 1e-5

SMALL = NextDiTConfig(
    patch_size=1, in_channels=32, dim=192, n_layers=2, n_refiner_layers=2, n_heads=6, n_kv_heads=2,
    multiple_of=64, cap_feat_dim=64, axes_dims=(8, 12, 12), axes_lens=(600, 512, 512),
    qk_norm_eps=1e-6, scan_layers=True)


def make_inputs(cfg, batch, h, w, cap_lens, cap_pad, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, h, w, cfg.in_channels)).astype(np.float32)
  t = rng.uniform(0.05, 0.95, (batch,)).astype(np.float32)
  cap = rng.standard_normal((batch, cap_pad, cfg.cap_feat_dim)).astype(np.float32)
  mask = np.arange(cap_pad)[None, :] < np.asarray(cap_lens)[:, None]
  cap = cap * mask[..., None]  # padded features are zero, as the tokenizer pipeline gives
  return x, t, cap, mask


def ours(cfg, official_state, inputs):
  params = convert.official_to_params(official_state, cfg)
  fn = jax.jit(lambda p, *a: NextDiT(cfg).apply({"params": p}, *a))
  return np.asarray(fn(params, *[jnp.asarray(a) for a in inputs]))


def max_err(cfg, state, inputs, reference=None):
  if reference is None:
    reference = ref.reference_forward(ref.build_reference(cfg, state), *inputs)
  return float(np.max(np.abs(ours(cfg, state, inputs) - reference))), reference


CASES = [
    # (name, config overrides, batch, H, W, caption lengths, padded caption length)
    ("p1_square", {}, 3, 8, 8, [5, 11, 1], 12),
    ("p1_nonsquare", {}, 3, 6, 10, [5, 11, 1], 12),
    ("p2_square", {"patch_size": 2}, 3, 8, 8, [5, 11, 1], 12),
    ("p2_nonsquare", {"patch_size": 2}, 3, 6, 12, [3, 12, 7], 12),
    ("p1_equal_lengths_padded", {}, 3, 6, 10, [7, 7, 7], 12),
    ("p1_no_padding_unscanned", {"scan_layers": False}, 3, 6, 10, [12, 12, 12], 12),
    ("p1_qk_eps_1e-5", {"qk_norm_eps": 1e-5}, 3, 6, 10, [5, 11, 1], 12),
]


@pytest.mark.parametrize("name,overrides,batch,h,w,cap_lens,cap_pad", CASES, ids=[c[0] for c in CASES])
def test_parity_with_diffusers(name, overrides, batch, h, w, cap_lens, cap_pad):
  cfg = dataclasses.replace(SMALL, **overrides)
  state = ref.random_official_state(cfg, seed=len(name))
  err, reference = max_err(cfg, state, make_inputs(cfg, batch, h, w, cap_lens, cap_pad))
  print(f"{name}: max abs err {err:.3g} (max |ref| {np.abs(reference).max():.3g})")
  assert err <= TOL


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_qk_norm_eps_is_a_real_field(eps):
  """Small q/k (RMS ~0.01) make the eps visible; each eps matches the reference with the same eps
  and misses the reference with the other one."""
  cfg = dataclasses.replace(SMALL, qk_norm_eps=eps)
  other = dataclasses.replace(SMALL, qk_norm_eps=1e-5 if eps == 1e-6 else 1e-6)
  state = ref.random_official_state(cfg, seed=3, qk_scale=0.01)
  inputs = make_inputs(cfg, 2, 6, 6, [4, 9], 9)
  err, _ = max_err(cfg, state, inputs)
  wrong = float(np.max(np.abs(ours(cfg, state, inputs) - ref.reference_forward(
      ref.build_reference(other, state), *inputs))))
  print(f"eps {eps}: err {err:.3g}, against the other eps {wrong:.3g}")
  assert err <= TOL
  assert wrong > 100 * TOL


@pytest.mark.slow
def test_parity_long_captions():
  """512-token captions and a 32x48 grid: position ids up to 511 on axis 0 and 47 on axis 2."""
  cfg = dataclasses.replace(SMALL, n_layers=1, n_refiner_layers=1)
  state = ref.random_official_state(cfg, seed=7)
  err, _ = max_err(cfg, state, make_inputs(cfg, 2, 32, 48, [300, 512], 512))
  print(f"long captions: max abs err {err:.3g}")
  assert err <= TOL


def test_parity_at_more_latent_sizes():
  """Three more latent sizes, one batch each (our model takes one size per batch; the official
  one a list): each matches the reference."""
  cfg = SMALL
  state = ref.random_official_state(cfg, seed=11)
  for h, w in [(8, 8), (4, 4), (6, 10)]:
    err, _ = max_err(cfg, state, make_inputs(cfg, 2, h, w, [3, 10], 10, seed=h * w))
    assert err <= TOL, (h, w, err)


# ---------------------------------------------------------------------------------------------
# Negative controls: each known-wrong variant must fail the same parity check.


@pytest.fixture(scope="module")
def control_case():
  cfg = SMALL
  state = ref.random_official_state(cfg, seed=5)
  inputs = make_inputs(cfg, 3, 6, 10, [5, 11, 1], 12)
  reference = ref.reference_forward(ref.build_reference(cfg, state), *inputs)
  assert np.max(np.abs(ours(cfg, state, inputs) - reference)) <= TOL
  return cfg, state, inputs, reference


def test_control_image_axis0_padded_caption_length(control_case, monkeypatch):
  cfg, state, inputs, reference = control_case
  real = nextdit.position_ids

  def wrong(cap_lens, cap_pad, gh, gw):
    cap_ids, _ = real(cap_lens, cap_pad, gh, gw)
    _, img_ids = real(jnp.full_like(cap_lens, cap_pad), cap_pad, gh, gw)
    return cap_ids, img_ids

  monkeypatch.setattr(nextdit, "position_ids", wrong)
  err, _ = max_err(cfg, state, inputs, reference)
  print(f"image axis-0 = padded length: {err:.3g}")
  assert err > 1e-2


def test_control_padded_caption_keys_unmasked(control_case, monkeypatch):
  cfg, state, inputs, reference = control_case
  real = layers.attention
  monkeypatch.setattr(layers, "attention", lambda q, k, v, kv_lengths=None, **kw: real(q, k, v, **kw))
  err, _ = max_err(cfg, state, inputs, reference)
  print(f"padded caption keys unmasked: {err:.3g}")
  assert err > 1e-2


def test_control_swapped_adaln_chunks(control_case):
  cfg, state, inputs, reference = control_case
  wrong = dict(state)
  for key in ("layers.0.adaLN_modulation.1.weight", "layers.0.adaLN_modulation.1.bias"):
    chunks = np.split(state[key], 4, axis=0)  # [scale_msa, gate_msa, scale_mlp, gate_mlp]
    wrong[key] = np.concatenate([chunks[2], chunks[1], chunks[0], chunks[3]], axis=0)
  err, _ = max_err(cfg, wrong, inputs, reference)
  print(f"scale_msa <-> scale_mlp swapped: {err:.3g}")
  assert err > 1e-2


def test_rope_tables_are_the_official_ones_within_an_ulp():
  """The official `precompute_freqs_cis` in torch (float64 angles cast to float32, then
  torch.polar): every cos/sin within 1 ulp (numpy's and torch's float32 cos/sin differ in their
  last bit for about one entry in nine). Angles multiplied in float32, a plausible slip, miss by
  far more at the long caption axis."""
  import torch

  def official(d, n):
    freqs = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64)[: d // 2] / d))
    angles = torch.outer(torch.arange(n, dtype=torch.float64), freqs).float()
    cis = torch.polar(torch.ones_like(angles), angles)
    return cis.real.numpy(), cis.imag.numpy()

  def ulps(got, want):
    return np.max(np.abs(got - want) / np.spacing(np.abs(want).astype(np.float32)))

  axes = ((32, 32, 32), (600, 512, 512))
  for (cos, sin), d, n in zip(layers.lumina_rope_tables(*axes), *axes):
    want_cos, want_sin = official(d, n)
    assert ulps(cos, want_cos) <= 1 and ulps(sin, want_sin) <= 1
  d, n = 32, 600
  freqs32 = (1.0 / 10000.0 ** (np.arange(0, d, 2, dtype=np.float64) / d)).astype(np.float32)
  slip = np.cos(np.outer(np.arange(n, dtype=np.float32), freqs32))
  assert ulps(slip, official(d, n)[0]) > 100
