"""Ahead-of-time compilation of the DiT train step: per-device memory and FLOPs without running it.

`compile_step` lowers and compiles the jitted step of `svg_jax.train.dit_task.DiTSetup` on abstract
inputs (`jax.ShapeDtypeStruct`s carrying their shardings), so nothing is allocated and a 2.6B
model can be compiled for a simulated pod on fake CPU devices
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

TPU slices need no TPU: `tpu_target` parses a Cloud accelerator type ("v5e-256", "2xv5p-128") and
builds its devices from libtpu's topology description (`jax.experimental.topologies`), and the
same step is compiled by XLA:TPU for them, Pallas kernels (splash attention) included. The
generation facts (HBM, peak FLOP/s, slice shapes) are `metrics.TPU_GENERATIONS` / `PEAK_TFLOPS`.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies

from svg_jax import config as config_lib
from svg_jax import parallel
from svg_jax.models import nextdit
from svg_jax.train import dit_task
from svg_jax.train import metrics as metrics_lib
from svg_jax.utils.error_lines import out_of_memory_line

GIB = 1024 ** 3
# The executables are never run, so LLVM need not optimize them: memory_analysis() (buffer
# assignment) and cost_analysis() (HLO) come from passes before codegen. Measured on the tiny step:
# identical FLOPs and temp bytes, 40% less compile time.
ANALYSIS_ONLY = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
LATENT_DOWNSAMPLE = 16  # DINOv3 ViT-S/16+: one latent pixel per 16x16 image patch


def latent_hw(config) -> tuple[int, int]:
  """The latent grid of a square image at the config's resolution (the encoder's patch size)."""
  r = int(config.data.resolution) // int(config.autoencoder.encoder.get("patch_size",
                                                                         LATENT_DOWNSAMPLE))
  return r, r


def abstract_batch(config, mesh, *, cap_len: int, hw: tuple[int, int] | None = None
                   ) -> dict[str, jax.ShapeDtypeStruct]:
  """The step's global batch as sharded ShapeDtypeStructs, in the dtypes the loader gives the
  trainer: the program compiled here is then the one the trainer runs (and loads from the
  persistent compilation cache)."""
  b = int(config.train.global_batch_size)
  h, w = hw or latent_hw(config)
  m = config.model
  loader = dit_task.pipeline_config(config, b)
  shapes = {"latent": ((b, h, w, int(m.in_channels)), jnp.dtype(loader.latent_dtype)),
            "text": ((b, cap_len, int(m.cap_feat_dim)), jnp.dtype(loader.text_dtype)),
            "text_mask": ((b, cap_len), jnp.bool_),
            "text_len": ((b,), jnp.int32)}
  return {k: jax.ShapeDtypeStruct(s, d, sharding=parallel.batch_sharding(mesh, len(s)))
          for k, (s, d) in shapes.items()}


def compile_step(config, mesh, *, cap_len: int, hw: tuple[int, int] | None = None,
                 compiler_options: dict | None = None):
  """Lowers and compiles `dit_task.DiTSetup(config, mesh).step` on abstract inputs.

  compiler_options default to ANALYSIS_ONLY on CPU devices, XLA's defaults on others.
  Returns (compiled, setup, seconds spent lowering + compiling)."""
  if compiler_options is None:
    compiler_options = ANALYSIS_ONLY if mesh_platform(mesh) == "cpu" else {}
  setup = dit_task.DiTSetup(config, mesh)  # built outside the mesh context, as the loop does
  batch = abstract_batch(config, mesh, cap_len=cap_len, hw=hw)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=parallel.replicated(mesh))
  start = time.perf_counter()
  with parallel.mesh_context(mesh, setup.rules):
    lowered = setup.step.lower(setup.abstract_state, batch, rng)
    compiled = lowered.compile(compiler_options=compiler_options)
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


# XLA's own rematerialization pass names each instruction it clones `<name>.remat`, `.remat2`, ...
# (jax.checkpoint's recomputation keeps XLA's usual names; its marks are only in the metadata).
_XLA_REMAT_CLONE = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+\.remat\d* = ", re.M)


def xla_recomputed(hlo_text: str) -> int:
  """Instructions XLA itself recomputes in an optimized program. XLA:GPU squeezes a program
  whose peak is over its own limit (80% of the card's memory less the program's inputs and
  outputs, whatever the allocator may use) by recomputing parts of it, whatever the remat
  policy asked: the program fits, but slower than its policy would run."""
  return len(_XLA_REMAT_CLONE.findall(hlo_text))


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
  if mesh_platform(setup.mesh) == "tpu":
    # XLA:TPU also gives its heap simulation's peak: equal to the sum above on a plain program,
    # 1-3 GiB under it on the 2B step, over it on a tiny step that reported no temporaries. The
    # total takes the larger, plus the program, which sits in HBM too.
    report["xla_peak"] = int(getattr(ma, "peak_memory_in_bytes", 0) or 0)
    report["program"] = ma.generated_code_size_in_bytes
    report["total"] = max(report["total"], report["xla_peak"]) + report["program"]
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
  if config.model.remat_policy not in ("full", "auto"):  # an unresolved auto compiles as full
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
          "attention": config.model.attention_backend,
          "activation_dtype": config.model.activation_dtype,
          "layer_loop": _layer_loop(config, mesh)}


def _layer_loop(config, mesh) -> str:
  """The loop the main layers compile to on `mesh` ("auto" resolved for its platform)."""
  with parallel.use_mesh(mesh):
    return nextdit.resolved_layer_loop(config_lib.nextdit_config(config))


def mesh_platform(mesh) -> str:
  return mesh.devices.flat[0].platform


# ----------------------------------------------------------------------------- TPU slices

_TARGET = re.compile(r"^(?:(\d+)\s*x\s*)?(v4|v5e|v5litepod|v5p|v6e)-(\d+)$")


def slice_shapes(generation: str) -> dict[int, tuple[int, ...]]:
  """chips -> the slice's chip grid, for the standard slices of a generation: from one host's
  box, double the last of the smallest axes (v5e 2x4, 4x4, ..., 16x16; v4 2x2x2, 2x2x4, 2x4x4)."""
  gen = metrics_lib.TPU_GENERATIONS[generation]
  shape = [2, 2, 1] if gen.torus_dims == 3 else [2, 2]
  shapes = {1: (1,) * gen.torus_dims} if gen.torus_dims == 2 else {}
  while math.prod(shape) <= gen.max_chips:
    shapes[math.prod(shape)] = tuple(shape)
    smallest = min(shape)
    i = max(j for j, n in enumerate(shape) if n == smallest)
    shape[i] *= 2
  return shapes


@dataclasses.dataclass(frozen=True)
class TpuTarget:
  """A TPU slice (or several) to compile for. `name` is Cloud's accelerator type."""
  name: str
  generation: str
  chips: int  # per slice
  num_slices: int
  shape: tuple[int, ...]  # a slice's chip grid

  @property
  def topology(self) -> str:
    return f"{self.generation}:{'x'.join(map(str, self.shape))}"

  @property
  def hbm_bytes(self) -> float:
    return metrics_lib.TPU_GENERATIONS[self.generation].hbm_gib * GIB

  @property
  def peak_flops(self) -> float:
    return metrics_lib.PEAK_TFLOPS[self.generation] * 1e12

  def devices(self) -> list:
    """The slices' devices from libtpu's topology description (no TPU needed)."""
    # libtpu takes a machine-wide lock file unless told otherwise; these processes only compile,
    # so several may load it at once (a test beside a running aot_compile.py).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    gen = metrics_lib.TPU_GENERATIONS[self.generation]
    topo = topologies.get_topology_desc(
        platform="tpu", topology_name=self.topology, chip_config_name=gen.chip_config,
        chips_per_host_bounds=gen.host_bounds, num_slices=self.num_slices)
    devices = list(topo.devices)
    if len(devices) != self.chips * self.num_slices:
      raise RuntimeError(f"libtpu built {len(devices)} devices for {self.name}, expected "
                         f"{self.chips * self.num_slices} (one per chip)")
    return devices


def tpu_target(text: str) -> TpuTarget:
  """'v5e-256', 'v5p-128', '2x v5e-256', '2xv6e-64' -> TpuTarget; a bad name raises one line.

  The number is Cloud's: chips for v5e / v6e, TensorCores (2 a chip) for v4 / v5p."""
  m = _TARGET.match(text.strip().lower())
  if not m:
    raise ValueError(f"bad TPU target {text!r}: expected [<slices>x]<generation>-<size>, e.g. "
                     "v5e-256, v5p-128, 2xv5e-256, generations "
                     f"{sorted(metrics_lib.TPU_GENERATIONS)}")
  slices, generation, size = int(m.group(1) or 1), m.group(2), int(m.group(3))
  generation = "v5e" if generation == "v5litepod" else generation
  gen = metrics_lib.TPU_GENERATIONS[generation]
  shapes = slice_shapes(generation)
  chips, rem = divmod(size, gen.cores_per_chip)
  if rem or chips not in shapes or slices < 1:
    sizes = ", ".join(str(c * gen.cores_per_chip) for c in sorted(shapes))
    raise ValueError(f"bad TPU target {text!r}: {generation} slices are {generation}-N with N in "
                     f"{sizes}" + (" (TensorCores, 2 a chip)" if gen.cores_per_chip > 1 else "")
                     + ("" if slices >= 1 else "; at least one slice"))
  name = f"{generation}-{size}" if slices == 1 else f"{slices}x{generation}-{size}"
  return TpuTarget(name, generation, chips, slices, shapes[chips])


def tpu_mesh(target: TpuTarget, sizes: dict[str, int]):
  """The mesh on `target`'s devices. `sizes` lay out the whole mesh on one slice; on several
  slices they lay out each slice, and the data axis is multiplied across the slices."""
  devices = target.devices()
  if target.num_slices == 1:
    return parallel.make_mesh(sizes, devices)
  return parallel.make_hybrid_mesh(sizes, target.num_slices, devices)


def fit_report(memory: dict[str, float], target: TpuTarget) -> dict[str, Any]:
  """The per-device total against the HBM XLA:TPU lets a program use on the chip."""
  hbm = target.hbm_bytes
  return {"hbm": hbm, "fits": memory["total"] <= hbm, "hbm_used": memory["total"] / hbm,
          "headroom": hbm - memory["total"]}


def step_report(config, mesh, *, cap_len: int, target: TpuTarget | None = None,
                flops: bool = False) -> dict[str, Any]:
  """Compiles the step of `config` on `mesh` and describes it: the mesh and batch layout, memory
  per device (`memory_report`), XLA's and our analytic FLOPs, and on a TPU target the fit
  against the chip's HBM. A TPU compile that XLA refuses for lack of HBM gives fits=False with
  its reason (no memory figures)."""
  out = describe(config, mesh)
  out.update(cap_len=cap_len, latent_hw=latent_hw(config),
             device_kind=mesh.devices.flat[0].device_kind)
  if target is not None:
    out.update(target=target.name, topology=target.topology, num_slices=target.num_slices,
               peak_tflops=metrics_lib.PEAK_TFLOPS[target.generation])
  out["analytic_flops"] = analytic_flops_per_device(config, mesh, cap_len=cap_len)
  try:
    compiled, setup, seconds = compile_step(config, mesh, cap_len=cap_len)
  except Exception as e:  # noqa: BLE001  (only XLA's out-of-memory refusal is a verdict)
    reason = out_of_memory_line(e) if target is not None else None
    if reason is None:
      raise
    out.update(compile_s=None, memory=None, fits=False, hbm=target.hbm_bytes, error=reason)
    return out
  out["compile_s"] = round(seconds, 1)
  out["memory"] = memory_report(compiled, setup)
  if target is not None:  # Mosaic kernels (splash attention) in the compiled program
    out["pallas_calls"] = compiled.as_text().count('custom_call_target="tpu_custom_call"')
  out["xla_flops_scanned"] = cost_flops(compiled)
  if target is not None:
    out.update(fit_report(out["memory"], target))
    out["ideal_step_s"] = out["analytic_flops"] / target.peak_flops
  if flops:
    f = xla_step_flops(config, mesh, cap_len=cap_len)
    out.update(xla_flops=f["total"], xla_flops_per_layer=f["per_layer"],
               flops_compile_s=round(f["seconds"], 1),
               analytic_over_xla=out["analytic_flops"] / f["total"],
               expected_from_remat=remat_expected_ratio(config, cap_len=cap_len))
  return out
