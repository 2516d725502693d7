"""The update-traffic probe: its minimum is 10 fp32 passes over this device's share of the
parameters, and XLA's compiled update moves no fewer bytes than that."""
import math

import jax

from configs import tiny
from research import update_traffic
from svg_jax import parallel
from svg_jax.train import dit_task


def test_the_compiled_update_moves_at_least_the_minimum():
  config = tiny.get_config()
  config.mesh.update(dict(data=1, fsdp=jax.device_count(), tensor=1))
  mesh = parallel.make_mesh(config.mesh)
  out = update_traffic.update_traffic(config, mesh)
  params = dit_task.DiTSetup(config, mesh).abstract_state.params
  total = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
  # FSDP shards the large kernels: a device holds between 1/devices and all of the parameters.
  assert total / jax.device_count() < out["params_per_device"] < total
  assert out["minimum_bytes"] == 40 * out["params_per_device"]
  assert out["bytes_accessed"] >= out["minimum_bytes"]
