"""A fused attention kernel's forward runs once per layer under every remat policy but full.

The kernels (cuDNN on GPUs, splash on TPUs) are custom_vjps whose forward keeps its output and
softmax statistics for the backward; the policies keep those through `kernel_residuals.NAME`.
Counted in the programs JAX and XLA build, not in our code:

- cuDNN: the tiny NextDiT's parameter gradient lowered by JAX for CUDA (StableHLO; lowering needs
  no GPU, only the cuDNN version JAX reads from the driver, which the test supplies). The
  `__cudnn$fmhaSoftmax` forward custom calls under each policy are as many as without remat;
  under full remat there are more (so the count sees a recomputed forward).
- `auto` takes cuDNN exactly where the trace compiles for a GPU with 16-bit compute (the same
  CUDA lowering, traced as for a GPU and for a CPU, bf16 and fp32), and only on Ampere or later.
- splash: the tiny train step compiled by XLA:TPU for a v5e-4 (libtpu's topology, nothing runs):
  the Mosaic kernels named `splash_mha_fwd` likewise.
- The reused residuals are the right ones: with splash (Pallas interpret mode on CPU) the
  gradients under dots and save_qkv_attn equal those without remat, on one device and under a
  (2, 2, 2) mesh (the kernel inside shard_map). This also runs a remat'd splash step, which
  failed before: the kernel's block tables, closed over by a custom_vjp, leaked out of the remat
  trace.
"""
import collections
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from svg_jax import config as config_lib
from svg_jax import parallel
from svg_jax.models import layers, nextdit
from svg_jax.train import aot

KEEPING = ("dots", "dots_no_batch", "save_qkv_attn", "offload_qkv_attn")  # every policy but full


def _tiny_config(**model):
  c = tiny.get_config()
  c.model.update({"n_layers": 3, "compute_dtype": "bfloat16", **model})
  return c


def _inputs(cfg, b=2, hw=8, lc=40):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((b, hw, hw, cfg.in_channels)), jnp.float32)
  t = jnp.asarray(rng.uniform(size=b), jnp.float32)
  cap = jnp.asarray(rng.standard_normal((b, lc, cfg.cap_feat_dim)), jnp.float32)
  cap_mask = jnp.arange(lc)[None] < jnp.asarray([lc, 3])[:, None]
  return x, t, cap, cap_mask


def _grad_fn(cfg, inputs):
  model = nextdit.NextDiT(cfg)
  x = inputs[0]
  return jax.grad(lambda p: jnp.mean(jnp.square(model.apply({"params": p}, *inputs) - x)))


@pytest.fixture
def cudnn_lowering(monkeypatch):
  """Lets this CPU-only process lower cuDNN attention for CUDA: JAX asks the (absent) driver for
  the cuDNN version while tracing, and our backend refuses to trace on a CPU device."""
  from jax._src.cudnn import fused_attention_stablehlo
  monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(layers, "_require_platform", lambda *args: None)


def _cudnn_forwards(policy):
  cfg = config_lib.nextdit_config(_tiny_config(attention_backend="cudnn", remat_policy=policy))
  inputs = _inputs(cfg)
  params = jax.eval_shape(lambda: nextdit.NextDiT(cfg).init(jax.random.PRNGKey(0), *inputs)["params"])
  text = jax.jit(_grad_fn(cfg, inputs)).trace(params).lower(lowering_platforms=("cuda",)).as_text()
  backward = len(re.findall(r"@__cudnn\$fmhaSoftmaxBackward\(", text))
  assert backward > 0
  return len(re.findall(r"@__cudnn\$fmhaSoftmax\(", text))


@pytest.mark.usefixtures("cudnn_lowering")
def test_cudnn_forward_runs_once_under_every_policy_but_full():
  once = _cudnn_forwards("none")
  assert _cudnn_forwards("full") > once
  for policy in KEEPING:
    assert _cudnn_forwards(policy) == once, policy


@pytest.mark.usefixtures("cudnn_lowering")
@pytest.mark.parametrize("platform, compute_dtype, fused", [
    ("gpu", "bfloat16", True),
    ("gpu", "float32", False),  # cuDNN would round fp32 inputs to bf16: "auto" keeps xla
    ("cpu", "bfloat16", False),
])
def test_auto_takes_cudnn_where_the_trace_compiles_for_a_gpu_with_16_bit_compute(
    monkeypatch, platform, compute_dtype, fused):
  """The tiny NextDiT's gradient with attention "auto", traced as for `platform` and lowered by
  JAX for CUDA: cuDNN's fused attention calls appear exactly where "auto" should take them."""
  monkeypatch.setattr(layers.splash_attention, "compile_platform", lambda: platform)
  cfg = config_lib.nextdit_config(_tiny_config(attention_backend="auto", remat_policy="none",
                                               compute_dtype=compute_dtype))
  inputs = _inputs(cfg)
  params = jax.eval_shape(lambda: nextdit.NextDiT(cfg).init(jax.random.PRNGKey(0), *inputs)["params"])
  text = jax.jit(_grad_fn(cfg, inputs)).trace(params).lower(lowering_platforms=("cuda",)).as_text()
  assert bool(re.search(r"@__cudnn\$fmhaSoftmax\(", text)) == fused


@pytest.mark.parametrize("capability, ok", [("7.0", False), ("8.0", True), ("9.0", True),
                                            (None, True)])
def test_cudnn_attention_needs_an_ampere_or_later_gpu(capability, ok):
  """jax runs cuDNN's fused attention from compute capability 8.0 on; a process without a GPU
  device (compiling for a described card) is not held back."""
  device = type("Device", (), {"compute_capability": capability})()
  assert layers._cuda_capability_ok(device) == ok  # pylint: disable=protected-access


def _splash_forwards(policy):
  # One remat'd layer: a recomputed forward (full) still adds a kernel to the count.
  c = _tiny_config(attention_backend="auto", remat_policy=policy, n_layers=1)
  c.mesh.update(dict(data=1, fsdp=4, tensor=1))
  c.train.global_batch_size = 8
  target = aot.tpu_target("v5e-4")
  compiled, _, _ = aot.compile_step(c, aot.tpu_mesh(target, dict(c.mesh)), cap_len=64)
  kernels = collections.Counter(
      re.search(r"splash_mha_([a-z]+)", line).group(1) for line in compiled.as_text().splitlines()
      if 'custom_call_target="tpu_custom_call"' in line)
  assert kernels["dq"] > 0 and kernels["dkv"] > 0
  return kernels["fwd"]


def test_splash_forward_runs_once_under_every_policy_but_full():
  once = _splash_forwards("none")
  assert _splash_forwards("full") > once
  assert _splash_forwards("dots") == once  # the others keep the same name (the cuDNN test)


@pytest.mark.parametrize("mesh_shape,policies", [
    (None, ("dots", "save_qkv_attn")), ((2, 2, 2), ("save_qkv_attn",))])
def test_splash_gradients_under_remat_are_no_remats(mesh_shape, policies):
  """Runs the step (before, a remat'd splash step compiled but refused to run: the kernel's block
  tables leaked out of the remat trace), and the kept residuals are the right ones."""
  # One remat'd layer (each layer makes its own kernel, so one shows a leak or a wrong residual),
  # besides the refiners' splash calls outside remat; batch 2 for two different caption masks.
  base = config_lib.nextdit_config(_tiny_config(attention_backend="splash", compute_dtype="float32",
                                                n_layers=1))
  inputs = _inputs(base)
  params = nextdit.NextDiT(base).init(jax.random.PRNGKey(0), *inputs)["params"]
  # Non-zero output layers, so the gradients reach every block.
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.PRNGKey(1), p.shape),
                        params)
  mesh = None if mesh_shape is None else parallel.make_mesh(dict(zip(parallel.MESH_AXES, mesh_shape)))

  def grads(policy):
    fn = jax.jit(_grad_fn(dataclasses.replace(base, remat_policy=policy), inputs))
    if mesh is None:
      return fn(params)
    with parallel.mesh_context(mesh, config_lib.DEFAULT_AXIS_RULES):
      return fn(params)

  want = dict(jax.tree_util.tree_leaves_with_path(grads("none")))
  for policy in policies:
    for path, g in jax.tree_util.tree_leaves_with_path(grads(policy)):
      scale = float(jnp.max(jnp.abs(want[path])))
      err = float(jnp.max(jnp.abs(g - want[path])))
      if scale > 0:
        assert err <= 1e-5 * scale, (policy, jax.tree_util.keystr(path), err / scale)
      else:  # a leaf the loss does not reach (norm_final) gets no gradient under remat either
        assert err == 0.0, (policy, jax.tree_util.keystr(path), err)
