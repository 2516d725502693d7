"""Sharding of the 2.6B train state from the logical rules, and AOT compilation of the train step.

- Every array of the 2B train state (params, AdamW moments, EMA) larger than 1 MiB is sharded on the
  `fsdp` mesh axis, on meshes (1, 8, 1) and (2, 2, 2) of the 8 fake devices, checked on the
  PartitionSpecs that `parallel.logical_shardings` derives from the boxed abstract state (nothing
  allocated) and on the per-device shard shapes.
- A tiny step compiled ahead of time: XLA's argument bytes equal the per-device shard bytes we
  compute for state + batch + rng, memory_analysis / cost_analysis are present, our analytic FLOP
  count is within 10% of XLA's (remat none, no loops), and the loop-unrolling extrapolation of
  `aot.xla_step_flops` on the scanned, micro-batched step matches XLA's count of the fully unrolled
  step.
"""
import copy
import importlib.util
import math
import os

import jax
import numpy as np
import pytest

from svg_jax import parallel
from svg_jax.train import aot, dit_task

ROOT = os.path.join(os.path.dirname(__file__), "..")
MIB = 2 ** 20


def _config(name, *args):
  spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs",
                                                                             f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (2, 2, 2)])
def test_2b_state_over_1mib_is_fsdp_sharded(mesh_shape):
  assert jax.device_count() == 8
  config = _config("svg_t2i_2b", "stage1_256")
  mesh = parallel.make_mesh(dict(zip(parallel.MESH_AXES, mesh_shape)))
  setup = dit_task.DiTSetup(config, mesh)  # eval_shape only: the 2.6B state is never allocated
  fsdp = mesh.shape["fsdp"]
  leaves = jax.tree_util.tree_leaves_with_path(setup.abstract_state)
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state.params))
  assert n_params == 2_611_246_336  # docs/reference.md §1.2: the state really is the 2B model's
  big = [(p, x) for p, x in leaves if math.prod(x.shape) * np.dtype(x.dtype).itemsize > MIB]
  assert len(big) > 50  # params, mu, nu, ema of every large kernel
  unsharded = []
  for path, x in big:
    spec = x.sharding.spec
    axes = [a for entry in spec if entry is not None
            for a in (entry if isinstance(entry, tuple) else (entry,))]
    shard = x.sharding.shard_shape(x.shape)
    if "fsdp" not in axes or math.prod(shard) * fsdp > math.prod(x.shape):
      unsharded.append(f"{jax.tree_util.keystr(path)} {x.shape} {spec}")
  assert not unsharded, "not sharded on fsdp:\n" + "\n".join(unsharded)
  # Small arrays may be replicated, but they must be a negligible part of the state.
  big_bytes = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for _, x in big)
  all_bytes = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for _, x in leaves)
  assert all_bytes - big_bytes < 0.01 * big_bytes


def _tiny(n_layers=3, scan=False, micro=1):
  c = _config("tiny")
  c.model.update(dict(n_layers=n_layers, scan_layers=scan, remat_policy="none"))
  c.mesh.update(dict(data=1, fsdp=8, tensor=1))
  c.train.global_batch_size = 16
  c.train.micro_batches = micro
  return c


HW, CAP = (4, 4), 16


def test_tiny_aot_memory_and_flops():
  config = _tiny()
  mesh = parallel.make_mesh(dict(config.mesh))
  compiled, setup, _ = aot.compile_step(config, mesh, cap_len=CAP, hw=HW)
  mem = aot.memory_report(compiled, setup)
  batch = aot.abstract_batch(config, mesh, cap_len=CAP, hw=HW)
  state_bytes = aot.per_device_bytes(setup.abstract_state)
  rng_bytes = 8  # the replicated uint32[2] key
  # jit drops inputs the step never reads: text_len (text_mask carries the caption lengths).
  del batch["text_len"]
  assert mem["arguments"] == state_bytes + aot.per_device_bytes(batch) + rng_bytes
  assert mem["params"] == mem["ema"] and mem["opt_state"] > 2 * mem["params"]  # mu, nu (+ counts)
  assert mem["temp"] > 0 and mem["aliased"] > 0.9 * state_bytes  # the state is donated
  xla = aot.cost_flops(compiled)
  analytic = aot.analytic_flops_per_device(config, mesh, cap_len=CAP, hw=HW)
  assert abs(analytic / xla - 1) < 0.10, (analytic, xla)

  # The extrapolation from unrolled 1- and 2-layer compiles, asked for the scanned, 2-micro-batch
  # step, gives XLA's count of the 3-layer unrolled step above.
  scanned = _tiny(scan=True, micro=2)
  est = aot.xla_step_flops(scanned, mesh, cap_len=CAP, hw=HW)
  assert abs(est["total"] / xla - 1) < 0.01, (est, xla)
  assert est["per_layer"] > 0


@pytest.mark.parametrize("program, squeezed", [("xla_gpu_80gib.hlo", False),
                                               ("xla_gpu_4mib.hlo", True)])
def test_xla_own_recomputation_is_read_from_the_program(program, squeezed):
  """One program (a 4-layer MLP's gradient, each layer under jax.checkpoint) as XLA:GPU compiled
  it for an 80 GiB card and for a 4 MiB one (tests/assets/xla_gpu_programs.py): only the second
  is over XLA's limit, and only there does XLA clone instructions to recompute them. Both carry
  jax.checkpoint's marks, which are no such clones."""
  with open(os.path.join(ROOT, "tests", "assets", program)) as f:
    text = f.read()
  assert "remat" in text  # jax.checkpoint's names in the metadata, in both
  assert (aot.xla_recomputed(text) > 0) == squeezed
