"""Writes the XLA:GPU programs that tests/test_aot.py reads: the gradient of a 4-layer tanh MLP,
each layer under jax.checkpoint, compiled by XLA:GPU for an H100 described with 80 GiB
(`xla_gpu_80gib.hlo`) and with 4 MiB (`xla_gpu_4mib.hlo`, over XLA's own limit, so XLA recomputes
parts of it). Needs no GPU, only jax's CUDA plugin at jax's version (research/gpu_roofline.py says
how):

  PYTHONPATH=<plugin dir> python tests/assets/xla_gpu_programs.py
"""
import dataclasses
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the plugin compiles for the described card only
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)  # research/

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from research import gpu_roofline  # noqa: E402


def loss(w, x):
  h = x
  for i in range(w.shape[0]):
    h = jax.checkpoint(lambda h, wi: jnp.tanh(h @ wi))(h, w[i])
  return jnp.sum(h)


def compile_for(memory_bytes: int) -> str:
  gpu = dataclasses.replace(gpu_roofline.GPUS["h100"], memory_bytes=memory_bytes)
  topology = topologies.get_topology_desc(platform="cuda", target_config=gpu.target_config(),
                                          topology="1x1x1")
  sharding = NamedSharding(Mesh(np.array(topology.devices), ("x",)), PartitionSpec())
  w = jax.ShapeDtypeStruct((4, 256, 256), jnp.float32, sharding=sharding)
  x = jax.ShapeDtypeStruct((1024, 256), jnp.float32, sharding=sharding)
  return jax.jit(jax.grad(loss)).lower(w, x).compile().as_text()


if __name__ == "__main__":
  for name, memory in (("xla_gpu_80gib.hlo", 80 * 2 ** 30), ("xla_gpu_4mib.hlo", 4 * 2 ** 20)):
    with open(os.path.join(HERE, name), "w") as f:
      f.write(compile_for(memory).replace(ROOT + os.sep, ""))  # the stack frames' file names
