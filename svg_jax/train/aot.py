"""Ahead-of-time compilation of the DiT train step: per-device memory and FLOPs without running it.

`compile_step` lowers and compiles the jitted step of `svg_jax.train.loop.Setup` on abstract inputs
(`jax.ShapeDtypeStruct`s carrying their shardings), so nothing is allocated and a 2.6B model can be
compiled for a simulated pod on fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`, set before jax is imported).

Two facts about XLA's numbers shape this file:
  - `memory_analysis()` reports one device's program: arguments (state + batch), outputs, the part
    of the outputs aliased to donated arguments, and temporaries. Parameter / optimizer / EMA bytes
    are split out of the argument total from the shard shapes of each sub-tree.
  - `cost_analysis()` counts the body of a `while` loop once, whatever its trip count (measured: a
    scanned 4-layer and 8-layer tiny model report nearly the same FLOPs). The step has two loops:
    the `nn.scan` over layers and the micro-batch `lax.scan`. `xla_step_flops` therefore compiles
    the same step unrolled (`scan_layers=False`, one micro-batch of the whole global batch) with 1
    and 2 layers and extrapolates linearly to `n_layers` (exact for a stack of identical blocks;
    FLOPs do not depend on how the batch is split into micro-batches, except the few elementwise
    gradient additions).
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from svg_jax import config as config_lib
from svg_jax import parallel
from svg_jax.models import layers
from svg_jax.train import loop
from svg_jax.train import metrics as metrics_lib

GIB = 1024 ** 3
# The executables are never run, so LLVM need not optimize them: memory_analysis() (buffer
# assignment) and cost_analysis() (HLO) come from passes before codegen. Measured on the tiny step:
# identical FLOPs and temp bytes, 40% less compile time.
ANALYSIS_ONLY = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
LATENT_DOWNSAMPLE = 16  # DINOv3 ViT-S/16+: one latent pixel per 16x16 image patch


def latent_hw(config) -> tuple[int, int]:
  r = int(config.data.resolution) // LATENT_DOWNSAMPLE
  return r, r


def abstract_batch(config, mesh, *, cap_len: int, hw: tuple[int, int] | None = None,
                   dtype=jnp.bfloat16) -> dict[str, jax.ShapeDtypeStruct]:
  """The step's global batch as sharded ShapeDtypeStructs (records store latents/text in bf16)."""
  b = int(config.train.global_batch_size)
  h, w = hw or latent_hw(config)
  m = config.model
  shapes = {"latent": ((b, h, w, int(m.in_channels)), dtype),
            "text": ((b, cap_len, int(m.cap_feat_dim)), dtype),
            "text_mask": ((b, cap_len), jnp.bool_),
            "text_len": ((b,), jnp.int32)}
  return {k: jax.ShapeDtypeStruct(s, d, sharding=parallel.batch_sharding(mesh, len(s)))
          for k, (s, d) in shapes.items()}


def compile_step(config, mesh, *, cap_len: int, hw: tuple[int, int] | None = None,
                 compiler_options: dict | None = None):
  """Lowers and compiles `loop.Setup(config, mesh).step` on abstract inputs.

  compiler_options default to ANALYSIS_ONLY.
  Returns (compiled, setup, seconds spent lowering + compiling)."""
  setup = loop.Setup(config, mesh)  # built outside the mesh context, as the loop does
  batch = abstract_batch(config, mesh, cap_len=cap_len, hw=hw)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=parallel.replicated(mesh))
  start = time.perf_counter()
  with parallel.mesh_context(mesh, setup.rules):
    lowered = setup.step.lower(setup.abstract_state, batch, rng)
    compiled = lowered.compile(
        compiler_options=ANALYSIS_ONLY if compiler_options is None else compiler_options)
  return compiled, setup, time.perf_counter() - start


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


def cost_flops(compiled) -> float:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):  # older jax: one dict per program
    ca = ca[0]
  if not ca or "flops" not in ca:
    raise RuntimeError(f"cost_analysis() has no 'flops' entry: {ca!r}")
  return float(ca["flops"])


def memory_report(compiled, setup) -> dict[str, float]:
  """Per-device bytes: the state split from the shardings, the rest from memory_analysis()."""
  ma = compiled.memory_analysis()
  if ma is None:
    raise RuntimeError("compiled.memory_analysis() returned None on this backend")
  st = setup.abstract_state
  report = {
      "params": per_device_bytes(st.params),
      "opt_state": per_device_bytes(st.opt_state),
      "ema": per_device_bytes(st.ema_params),
      "arguments": ma.argument_size_in_bytes,
      "outputs": ma.output_size_in_bytes,
      "aliased": ma.alias_size_in_bytes,
      "temp": ma.temp_size_in_bytes,
  }
  # Peak live bytes: inputs + temporaries + the outputs that do not reuse a donated input.
  report["total"] = ma.argument_size_in_bytes + ma.temp_size_in_bytes + max(
      ma.output_size_in_bytes - ma.alias_size_in_bytes, 0)
  return report


def _variant(config, **model_updates):
  c = copy.deepcopy(config)
  with c.unlocked():
    c.model.update(model_updates)
    c.train.micro_batches = 1
  return c


def xla_step_flops(config, mesh, *, cap_len: int, hw: tuple[int, int] | None = None
                   ) -> dict[str, float]:
  """XLA's per-device FLOPs of the whole step, with the loops unrolled (see the module docstring).

  Compiles the unrolled step with 1 and 2 layers; per_layer = F(2) - F(1); total =
  F(1) + (n_layers - 1) * per_layer. Returns {"total", "per_layer", "one_layer", "seconds"}."""
  n = int(config.model.n_layers)
  flops: dict[int, float] = {}
  seconds = 0.0
  for n_layers in (1, 2):
    c = _variant(config, n_layers=n_layers, scan_layers=False)
    compiled, _, dt = compile_step(c, mesh, cap_len=cap_len, hw=hw)
    flops[n_layers] = cost_flops(compiled)
    seconds += dt
  per_layer = flops[2] - flops[1]
  return {"total": flops[1] + (n - 1) * per_layer, "per_layer": per_layer, "one_layer": flops[1],
          "seconds": seconds}


def analytic_flops_per_device(config, mesh, *, cap_len: int, hw=None) -> float:
  cfg = config_lib.nextdit_config(config)
  total = metrics_lib.dit_train_flops(cfg, int(config.train.global_batch_size),
                                      hw or latent_hw(config), cap_len)
  return total / mesh.devices.size


def remat_expected_ratio(config, *, cap_len: int, hw=None) -> float:
  """The analytic / XLA FLOP ratio that activation recomputation alone explains.

  `full` remat runs the forward of every main-stack block a second time in the backward (the
  refiners are not rematerialized); the `dots*` policies save matmul outputs, so only elementwise
  work (not in the analytic count) is recomputed and the expectation is 1."""
  if config.model.remat_policy != "full":
    return 1.0
  cfg = config_lib.nextdit_config(config)
  h, w = hw or latent_hw(config)
  b = int(config.train.global_batch_size)
  s = (h // cfg.patch_size) * (w // cfg.patch_size) + cap_len
  total = metrics_lib.dit_train_flops(cfg, b, (h, w), cap_len)
  layers_forward = b * cfg.n_layers * (
      2 * s * metrics_lib.block_matmul_params(cfg) + 4 * cfg.n_heads * cfg.head_dim * s * s
      + 2 * cfg.adaln_dim * 4 * cfg.dim)
  return total / (total + layers_forward)


def describe(config, mesh) -> dict[str, Any]:
  shape = dict(zip(parallel.MESH_AXES, mesh.devices.shape))
  b = int(config.train.global_batch_size)
  micro = int(config.train.micro_batches)
  shards = parallel.batch_axis_size(mesh)
  return {"mesh": shape, "devices": mesh.devices.size, "global_batch": b, "micro_batches": micro,
          "per_device_micro_batch": b // micro / shards,
          "remat": config.model.remat_policy, "n_layers": int(config.model.n_layers),
          "attention": config.model.attention_backend}
