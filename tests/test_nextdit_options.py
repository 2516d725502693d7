"""Implementation options of the NextDiT that must not change the function it computes (scan, remat,
attention backend dispatch, compute dtype), and the logical axis names every parameter carries.

bf16 activations (`activation_dtype`) round like the official trainer's bf16 autocast: against
diffusers' model in fp32, our output errs by at most 1.5x what diffusers' own forward under
`torch.autocast(bfloat16)` errs (measured 0.8-1.1x, 0.8-0.9% of the output's range), and more than
with bf16 matmuls alone (0.5-0.6%), so the activations are really rounded. bf16 matmuls alone
err less than that autocast (relative RMS error 0.64-0.68x autocast's)."""
import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nextdit_reference as ref
from svg_jax.convert import nextdit as keymap
from svg_jax.models import layers
from svg_jax.models.nextdit import NextDiT, NextDiTConfig

CFG = NextDiTConfig(
    patch_size=1, in_channels=16, dim=96, n_layers=2, n_refiner_layers=1, n_heads=6, n_kv_heads=2,
    multiple_of=32, cap_feat_dim=32, axes_dims=(4, 6, 6), scan_layers=True)


def _inputs():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 6, CFG.in_channels)).astype(np.float32)
  t = np.array([0.3, 0.8], np.float32)
  cap = rng.standard_normal((2, 8, CFG.cap_feat_dim)).astype(np.float32)
  mask = np.arange(8)[None] < np.array([[3], [8]])
  return x, t, cap, mask


def _loss_and_grad(cfg, state, inputs):
  params = keymap.official_to_params(state, cfg)
  model = NextDiT(cfg)

  def loss(p):
    return jnp.mean(jnp.square(model.apply({"params": p}, *inputs)))

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return float(value), keymap.params_to_official(grads, cfg)


@pytest.mark.parametrize("options", [
    dict(remat_policy="full"), dict(remat_policy="dots"),
    dict(remat_policy="save_qkv_attn", scan_unroll=2),
    dict(scan_layers=False, remat_policy="full"),
    dict(scan_layers=False, remat_policy="dots_no_batch"),
    dict(layer_loop="unrolled"), dict(layer_loop="unrolled", remat_policy="dots"),
    dict(layer_loop="unrolled", remat_policy="full")], ids=str)
def test_scan_and_remat_do_not_change_values_or_gradients(options):
  cfg = dataclasses.replace(CFG, n_layers=3)  # 3 layers: a partly unrolled loop
  state = ref.random_official_state(cfg, seed=2)
  inputs = _inputs()
  base_value, base_grads = _loss_and_grad(dataclasses.replace(cfg, remat_policy="none"), state,
                                          inputs)
  value, grads = _loss_and_grad(dataclasses.replace(cfg, **options), state, inputs)
  assert abs(value - base_value) <= 1e-6 * abs(base_value)
  for k in base_grads:
    np.testing.assert_allclose(grads[k], base_grads[k], rtol=1e-4, atol=1e-6, err_msg=k)


def _gradient(cfg):
  params = nn.meta.unbox(NextDiT(cfg).init(jax.random.PRNGKey(0), *_inputs())["params"])

  def loss(p):
    return jnp.mean(jnp.square(NextDiT(cfg).apply({"params": p}, *_inputs())))

  return jax.jit(jax.grad(loss)).lower(params)


def test_unrolled_layers_have_no_loop_and_keep_the_remat():
  """The full remat's gradient recomputes each main layer's forward (7 products: q, k, v, out,
  w1, w3, w2), and its recomputation goes through JAX's barrier: with no loop between the
  forward and the backward, XLA:GPU otherwise merges it back into the forward (the 2B stage-1
  step then took none's memory; XLA:CPU happens not to merge it)."""
  cfg = dataclasses.replace(CFG, n_layers=3, layer_loop="unrolled")
  dots, barriers = {}, {}
  for policy in ("none", "full"):
    lowered = _gradient(dataclasses.replace(cfg, remat_policy=policy))
    barriers[policy] = lowered.as_text().count("stablehlo.optimization_barrier")
    text = lowered.compile().as_text()
    assert " while(" not in text, policy
    dots[policy] = len(re.findall(r" dot\(", text))
  assert dots["full"] - dots["none"] >= cfg.n_layers * 7, dots
  assert barriers == {"none": 0, "full": cfg.n_layers}, barriers
  assert " while(" in _gradient(dataclasses.replace(CFG, n_layers=3)).compile().as_text()


@pytest.mark.parametrize("platform,unrolled", [("cpu", False), ("tpu", False), ("gpu", True),
                                               ("cuda", True)])
def test_layer_loop_auto_unrolls_where_the_trace_compiles_for_a_gpu(platform, unrolled,
                                                                      monkeypatch):
  monkeypatch.setattr(layers.splash_attention, "compile_platform", lambda: platform)
  cfg = dataclasses.replace(CFG, n_layers=3, layer_loop="auto")
  params = NextDiT(cfg).init(jax.random.PRNGKey(0), *_inputs())["params"]
  text = jax.jit(NextDiT(cfg).apply).lower({"params": nn.meta.unbox(params)}, *_inputs()).as_text()
  assert ("stablehlo.while" not in text) == unrolled


def _rel_errors(got, want) -> tuple[float, float]:
  """(RMS, max) of got - want relative to want's RMS and max."""
  return (float(np.sqrt(np.mean((got - want) ** 2) / np.mean(want ** 2))),
          float(np.abs(got - want).max() / np.abs(want).max()))


def test_bf16_errs_like_the_official_autocast():
  """Against diffusers' fp32 model, per seed: bf16 matmuls alone (compute_dtype=bfloat16, fp32
  activations) err no more than diffusers' own forward under torch.autocast(bfloat16) and far
  more than fp32 rounding (bf16 is used, activations between ops are not rounded); bf16
  activations too err more than that, and like autocast. CPU autocast rounds here what CUDA's
  does: no op of CUDA's fp32 list sees a bf16 input."""
  import torch
  inputs = _inputs()
  for seed in (3, 4):
    state = ref.random_official_state(CFG, seed=seed)
    model = ref.build_reference(CFG, state)
    want = ref.reference_forward(model, *inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
      errs = {"autocast": _rel_errors(ref.reference_forward(model, *inputs), want)}
    for name, act in (("bf16_matmuls", "float32"), ("bf16_activations", "compute")):
      cfg = dataclasses.replace(CFG, compute_dtype="bfloat16", activation_dtype=act)
      out = np.asarray(jax.jit(NextDiT(cfg).apply)(
          {"params": keymap.official_to_params(state, cfg)}, *inputs))
      assert out.dtype == np.float32
      errs[name] = _rel_errors(out, want)
    print(f"seed {seed} bf16 vs diffusers fp32 (relative RMS, max): "
          + ", ".join(f"{k} {r:.3g}, {m:.3g}" for k, (r, m) in errs.items()))
    (mm_rms, mm_max), (ac_rms, ac_max) = errs["bf16_matmuls"], errs["autocast"]
    # Measured bf16 matmuls / autocast over seeds 3-6: RMS 0.64-0.68, max 0.51-0.80. Rounding the
    # activations too gives RMS 1.07-1.17; fp32 compute gives 4e-7.
    assert 1e-4 < mm_rms <= ac_rms, errs
    assert mm_max < errs["bf16_activations"][1] <= 1.5 * ac_max, errs
  # Gradients stay close to fp32's.
  state = ref.random_official_state(CFG, seed=3)
  _, base = _loss_and_grad(CFG, state, inputs)
  _, grads = _loss_and_grad(dataclasses.replace(CFG, compute_dtype="bfloat16",
                                                activation_dtype="compute"), state, inputs)
  for k in base:
    rel = np.abs(grads[k] - base[k]).max() / max(np.abs(base[k]).max(), 1e-12)
    assert rel < 0.05, (k, rel)  # measured at most 0.021 (bf16 matmuls alone: 0.017)


@pytest.fixture(params=["cpu", "gpu"])
def compile_platform(request, monkeypatch):
  """The Linear's product as it is traced for this platform (a GPU's runs here on the CPU)."""
  monkeypatch.setattr(layers.splash_attention, "compile_platform", lambda: request.param)
  return request.param


@pytest.mark.parametrize("use_bias", [False, True])
def test_bf16_linears_round_once_like_torch(use_bias, compile_platform):
  """A Linear with bf16 compute and bf16 output is torch's bf16 Linear: one rounding of the fp32
  sums (plus bias), whether the GEMM rounds (no bias) or the sum does. Kernels add the products
  in their own order, so a sum within fp32 noise of a bf16 midpoint may round to either side:
  at most one bf16 step apart, and rarely (2 of 5120 here without a bias, none with one)."""
  import torch
  rng = np.random.default_rng(5)
  x = rng.standard_normal((64, 96)).astype(jnp.bfloat16).astype(np.float32)
  w = rng.standard_normal((96, 80)).astype(jnp.bfloat16).astype(np.float32)
  b = rng.standard_normal(80).astype(jnp.bfloat16).astype(np.float32)
  params = {"kernel": w, "bias": b} if use_bias else {"kernel": w}
  linear = layers.Linear(80, use_bias=use_bias, compute_dtype=jnp.bfloat16,
                         out_dtype=jnp.bfloat16)
  ours = np.asarray(linear.apply({"params": params}, jnp.asarray(x).astype(jnp.bfloat16)))
  tb = torch.from_numpy(b).bfloat16() if use_bias else None
  theirs = torch.nn.functional.linear(torch.from_numpy(x).bfloat16(),
                                      torch.from_numpy(w.T.copy()).bfloat16(), tb)
  assert ours.dtype == jnp.bfloat16
  ours, theirs = ours.astype(np.float32), theirs.float().numpy()
  step = np.abs(theirs) * 2.0 ** -7  # a bf16 step at most (8 bits of mantissa)
  assert np.all(np.abs(ours - theirs) <= step), np.abs(ours - theirs).max()
  assert np.mean(ours != theirs) < 1e-3


def test_dots_remat_saves_bias_free_bf16_products_in_bf16_on_a_gpu(capsys, compile_platform):
  """Under the `dots` policy the saved matmul outputs of bf16 activations are, on a GPU, the bf16
  values the forward hands on, not fp32 copies of twice the size (XLA:GPU keeps what JAX saves;
  XLA:TPU saves the bf16 value either way)."""
  linear = layers.Linear(64, use_bias=False, compute_dtype=jnp.bfloat16, out_dtype=jnp.bfloat16)
  x = jnp.ones((32, 48), jnp.bfloat16)
  params = linear.init(jax.random.key(0), x)

  def f(p, x):
    return jnp.sum(jnp.tanh(linear.apply(p, x).astype(jnp.float32)))

  policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(f, policy=policy), params, x)
  saved = capsys.readouterr().out
  kept = "bf16[32,64]" if compile_platform == "gpu" else "f32[32,64]"
  assert kept in saved and len(saved.splitlines()) == 3, saved  # the params, x, the product


def test_activation_dtype_is_float32_or_the_compute_dtype():
  assert dataclasses.replace(CFG, activation_dtype="compute").activations == jnp.float32
  bf16 = dataclasses.replace(CFG, compute_dtype="bfloat16", activation_dtype="compute")
  assert bf16.activations == jnp.bfloat16
  with pytest.raises(ValueError, match="activation_dtype"):
    dataclasses.replace(CFG, activation_dtype="bfloat16").validate()


# splash runs on CPU in Pallas interpret mode (tests/test_splash.py).
@pytest.mark.parametrize("backend,hardware", [("cudnn", "gpu")])
def test_hardware_backends_refuse_to_run_on_cpu(backend, hardware):
  q = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(RuntimeError, match=f"needs a {hardware}"):
    layers.attention(q, q, q, backend=backend)
  cfg = dataclasses.replace(CFG, attention_backend=backend)
  with pytest.raises(RuntimeError, match="attention_backend='xla'"):
    NextDiT(cfg).init(jax.random.PRNGKey(0), *_inputs())


def test_unknown_options_are_clear_errors():
  with pytest.raises(ValueError, match="remat_policy"):
    dataclasses.replace(CFG, remat_policy="sometimes").validate()
  with pytest.raises(ValueError, match="attention backend"):
    layers.attention(jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 2, 2, 4)),
                     backend="flash")
  with pytest.raises(ValueError, match=r"scan_unroll 2 not in \[1, 1\] .*layer_loop='unrolled'"):
    dataclasses.replace(CFG, scan_unroll=2).validate()
  with pytest.raises(ValueError, match="layer_loop 'unroll' not in"):
    dataclasses.replace(CFG, layer_loop="unroll").validate()
  with pytest.raises(ValueError, match="sum\\(axes_dims\\)"):
    dataclasses.replace(CFG, axes_dims=(4, 4, 4)).validate()
  with pytest.raises(ValueError, match="unknown NextDiT config fields"):
    NextDiTConfig.from_dict({"dim": 8, "depth": 3})


@pytest.mark.parametrize("scan", [True, False])
def test_every_parameter_has_logical_axis_names(scan):
  boxed = NextDiT(dataclasses.replace(CFG, scan_layers=scan)).init(
      jax.random.PRNGKey(0), *_inputs())["params"]
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(l, nn.LogicallyPartitioned) for l in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim and all(n is not None for n in leaf.names)
