"""The NextDiT forward with params sharded by the logical rules over 8 fake CPU devices equals the
single-device forward."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svg_jax import config as config_lib
from svg_jax import parallel
from svg_jax.models.nextdit import NextDiT, NextDiTConfig

CFG = NextDiTConfig(
    patch_size=1, in_channels=16, dim=96, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=2,
    multiple_of=32, cap_feat_dim=32, axes_dims=(8, 8, 8), scan_layers=True)


def _inputs(batch=8):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, 4, 6, CFG.in_channels)).astype(np.float32)
  t = rng.uniform(size=(batch,)).astype(np.float32)
  cap = rng.standard_normal((batch, 8, CFG.cap_feat_dim)).astype(np.float32)
  mask = np.arange(8)[None] < rng.integers(1, 9, (batch,))[:, None]
  return x, t, cap, mask


@pytest.mark.parametrize("mesh_sizes", [dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2),
                                        dict(data=1, fsdp=4, tensor=2)])
def test_sharded_forward_equals_single_device(mesh_sizes):
  assert jax.device_count() == 8
  model = NextDiT(dataclasses.replace(CFG, scan_layers=mesh_sizes["tensor"] == 2))
  inputs = _inputs()
  boxed = model.init(jax.random.PRNGKey(0), *inputs)["params"]
  # Random (non-zero) adaLN / final weights so every path matters.
  leaves, tree = jax.tree_util.tree_flatten(nn.meta.unbox(boxed))
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = tree.unflatten([l + 0.05 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])
  single = np.asarray(jax.jit(model.apply)({"params": params}, *inputs))

  mesh = parallel.make_mesh(mesh_sizes)
  rules = config_lib.DEFAULT_AXIS_RULES
  shardings = parallel.logical_shardings(boxed, mesh, rules)
  sharded_params = jax.device_put(params, shardings)
  batch = [jax.device_put(a, parallel.batch_sharding(mesh, a.ndim)) for a in inputs]
  with parallel.mesh_context(mesh, rules):
    out = jax.jit(model.apply)({"params": sharded_params}, *batch)
  # Parameters really are distributed: the 2-D kernels of a block live in pieces.
  kernel = sharded_params["layers"]["block"]["feed_forward"]["w1"]["kernel"] if "layers" in \
      sharded_params else sharded_params["layers_0"]["feed_forward"]["w1"]["kernel"]
  if mesh_sizes["fsdp"] * mesh_sizes["tensor"] > 1:
    assert len({str(s.index) for s in kernel.addressable_shards}) > 1
  np.testing.assert_allclose(np.asarray(out), single, atol=2e-5, rtol=0)


def test_bad_mesh_is_one_clear_error():
  with pytest.raises(ValueError, match="needs 12 devices but this run has 8"):
    parallel.mesh_shape(dict(data=3, fsdp=2, tensor=2), 8)
  with pytest.raises(ValueError, match="does not divide"):
    parallel.mesh_shape(dict(data=-1, fsdp=3, tensor=1), 8)
  assert parallel.mesh_shape(dict(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
