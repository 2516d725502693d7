"""Splash attention (JAX's Pallas TPU kernel, run here in Pallas interpret mode) against JAX's own
attention and our `xla` backend.

- `jax.nn.dot_product_attention` (JAX's implementation, GQA and key-value lengths) in fp32 is the
  reference. In fp32 the splash backend matches it to 2e-5 in outputs and in the gradients of q,
  k, v, with padded keys (lengths 1..S) and without, on one device and under a (2, 2, 2) mesh
  (the kernel inside `shard_map`: batch over data x fsdp, heads over tensor), with sequence
  lengths that are not multiples of the kernel's 128-token blocks (padded inside the backend).
- In bf16 (matmul inputs rounded, fp32 accumulation) both backends differ from the fp32 reference
  by bf16 rounding (2^-8 relative): splash's outputs within 2e-2 absolute (they are O(1); the
  kernel returns bf16, the xla backend fp32), its gradients within 1e-2 relative, each error at
  most 3x the `xla` backend's own (measured: 1.7x on outputs, 1.1-2.8x on gradients).
- An example whose keys are all masked gives finite values (the xla backend's uniform average is
  finite too; the model never produces one: a caption keeps at least one token).
- The tiny NextDiT with backend splash gives the xla backend's velocity and parameter gradients
  (fp32, 1e-4 relative): the caption refiner (caption key mask), the noise refiner (no mask) and
  the joint layers ([image | caption] with per-example key lengths) all go through the kernel.
- Backend `auto` is `xla` on CPU (the kernel is only chosen when compiling for TPUs,
  tests/test_aot_tpu.py).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svg_jax import config as config_lib
from svg_jax import parallel
from svg_jax.models import layers, nextdit

B, T, H, KV, D = 4, 200, 6, 2, 64  # T: not a multiple of 128
LENGTHS = (200, 57, 1, 131)
ROOT = os.path.join(os.path.dirname(__file__), "..")


def _qkv(dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal(s).astype(dtype) for s in
             ((B, T, H, D), (B, T, KV, D), (B, T, KV, D)))
  return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def _reference(q, k, v, lengths):
  return jax.nn.dot_product_attention(
      q, k, v, key_value_seq_lengths=lengths, implementation="xla").astype(jnp.float32)


def _loss_and_grads(fn, q, k, v):
  """Output and the gradients of a fixed random projection of it (every element matters)."""
  w = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, H, D)), jnp.float32)
  return jax.jit(jax.value_and_grad(lambda *a: (lambda o: (jnp.sum(o * w), o))(fn(*a)),
                                    argnums=(0, 1, 2), has_aux=True))(q, k, v)


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("mesh_shape", [None, (2, 2, 2)])
def test_splash_fp32_matches_jax_attention(padded, mesh_shape):
  q, k, v = _qkv()
  lengths = jnp.asarray(LENGTHS, jnp.int32) if padded else None

  def splash(q, k, v):
    return layers.attention(q, k, v, kv_lengths=lengths, backend="splash")

  def ref(q, k, v):
    return _reference(q, k, v, lengths)

  (_, out_ref), g_ref = _loss_and_grads(ref, q, k, v)
  if mesh_shape is None:
    (_, out), g = _loss_and_grads(splash, q, k, v)
  else:
    mesh = parallel.make_mesh(dict(zip(parallel.MESH_AXES, mesh_shape)))
    with parallel.mesh_context(mesh, config_lib.DEFAULT_AXIS_RULES):
      (_, out), g = _loss_and_grads(splash, q, k, v)
      lowered = jax.jit(splash).lower(q, k, v).as_text()
    assert "manual_computation" in lowered  # the kernel ran inside shard_map
  assert float(jnp.max(jnp.abs(out - out_ref))) < 2e-5
  for name, a, b in zip("qkv", g, g_ref):
    assert _rel(a, b) < 2e-5, name
  if padded:  # padded keys get no weight, so no gradient
    for i, n in enumerate(LENGTHS):
      assert float(jnp.max(jnp.abs(g[1][i, n:]), initial=0.0)) == 0.0
      assert float(jnp.max(jnp.abs(g[2][i, n:]), initial=0.0)) == 0.0


def test_splash_bf16_error_is_the_xla_backends():
  q, k, v = _qkv()
  lengths = jnp.asarray(LENGTHS, jnp.int32)
  (_, out_ref), g_ref = _loss_and_grads(lambda *a: _reference(*a, lengths), q, k, v)
  errors = {}
  for backend in ("xla", "splash"):
    fn = lambda q, k, v, b=backend: layers.attention(  # noqa: E731
        q, k, v, kv_lengths=lengths, backend=b, compute_dtype=jnp.bfloat16)
    (_, out), g = _loss_and_grads(fn, q, k, v)
    errors[backend] = [float(jnp.max(jnp.abs(out - out_ref)))] + [
        _rel(a, b) for a, b in zip(g, g_ref)]
  for i, (xla_err, splash_err) in enumerate(zip(errors["xla"], errors["splash"])):
    assert xla_err > 1e-4  # bf16 rounding really happened
    assert splash_err < 3 * xla_err and splash_err < (2e-2 if i == 0 else 1e-2), errors


def test_splash_all_keys_masked_is_finite():
  q, k, v = _qkv()
  lengths = jnp.asarray([0, 5, 0, 200], jnp.int32)
  out = layers.attention(q, k, v, kv_lengths=lengths, backend="splash")
  assert bool(jnp.all(jnp.isfinite(out)))
  ref = _reference(q, k, v, lengths)
  np.testing.assert_allclose(out[1], ref[1], atol=2e-5)
  # The xla backend: every logit equally masked, so the uniform average of all values (query
  # head h reads kv head h // (H / KV)).
  xla = layers.attention(q, k, v, kv_lengths=lengths, backend="xla")
  assert bool(jnp.all(jnp.isfinite(xla)))
  mean_v = np.repeat(np.asarray(v).mean(axis=1), H // KV, axis=1)  # [B, H, D]
  for i in (0, 2):
    np.testing.assert_allclose(xla[i], np.broadcast_to(mean_v[i], (T, H, D)), atol=1e-5)


def _tiny_model_config(backend):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg_tiny", os.path.join(ROOT, "configs",
                                                                         "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.model.update(dict(n_layers=1, attention_backend=backend))
  return config_lib.nextdit_config(c)


def test_nextdit_splash_matches_xla():
  rng = np.random.default_rng(0)
  b, hw, lc = 2, 8, 40  # joint sequence 64 + 40: padded to 128 inside the backend
  cfg = _tiny_model_config("xla")
  x = jnp.asarray(rng.standard_normal((b, hw, hw, cfg.in_channels)), jnp.float32)
  t = jnp.asarray(rng.uniform(size=b), jnp.float32)
  cap = jnp.asarray(rng.standard_normal((b, lc, cfg.cap_feat_dim)), jnp.float32)
  cap_mask = jnp.arange(lc)[None] < jnp.asarray([40, 3])[:, None]
  params = nextdit.NextDiT(cfg).init(jax.random.PRNGKey(0), x, t, cap, cap_mask)["params"]
  # Non-zero output layers, so the gradients reach every block.
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.PRNGKey(1), p.shape),
                        params)
  results = {}
  for backend in ("xla", "splash"):
    model = nextdit.NextDiT(_tiny_model_config(backend))

    def loss(p, model=model):
      out = model.apply({"params": p}, x, t, cap, cap_mask)
      return jnp.mean(jnp.square(out - x)), out

    results[backend] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  (_, out_x), g_x = results["xla"]
  (_, out_s), g_s = results["splash"]
  assert _rel(out_s, out_x) < 1e-4
  flat_x = dict(jax.tree_util.tree_leaves_with_path(g_x))
  for path, g in jax.tree_util.tree_leaves_with_path(g_s):
    ref = flat_x[path]
    if float(jnp.max(jnp.abs(ref))) > 0:
      assert _rel(g, ref) < 1e-4, jax.tree_util.keystr(path)
    else:  # a leaf the loss does not reach (norm_final) gets no gradient here either
      assert float(jnp.max(jnp.abs(g))) == 0.0, jax.tree_util.keystr(path)


def test_auto_backend_is_xla_on_cpu():
  q, k, v = _qkv()
  lengths = jnp.asarray(LENGTHS, jnp.int32)
  text = jax.jit(lambda q, k, v: layers.attention(q, k, v, kv_lengths=lengths, backend="auto")
                 ).lower(q, k, v).as_text()
  assert "tpu_custom_call" not in text and "pallas" not in text.lower()
