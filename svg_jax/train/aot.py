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
generation facts (HBM, peak FLOP/s, slice shapes) are `chip_specs.TPU_GENERATIONS` / `PEAK_TFLOPS`.

`compile_report` is one run of launch/aot_compile.py: the mesh its flags lay out (`slice_sizes`,
`compile_mesh`), the micro-batches a per-device batch asks for, the training loop's own config
checks (`check_config`), then `step_report`; `report_lines` prints it. Bad input (a target, a
mesh, a batch that does not divide) raises one line (`input_errors.InputError`). The same script
over many combinations, one process each, is svg_jax/train/aot_sweep.py.
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
from ml_collections.config_flags import config_path

from svg_jax import config as config_lib
from svg_jax import input_errors, parallel
from svg_jax.models import layers, nextdit
from svg_jax.train import chip_specs, dit_task, flop_count, loop
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


_TPU_CUSTOM_CALL = 'custom_call_target="tpu_custom_call"'
# Where the next instruction or the computation's end begins (a Pallas call spans several lines).
_INSTRUCTION_END = re.compile(r"\n\s*(?:ROOT )?%|\n\}\n")
_PALLAS_OP = re.compile(r'op_name="[^"]*pallas_call"')


def pallas_calls(hlo_text: str) -> int:
  """Pallas (Mosaic) kernel calls in an XLA:TPU program: splash attention's kernels, ours.

  Both these and kernels XLA:TPU writes itself are `tpu_custom_call`s: with the `xla` attention
  backend it rewrites the softmax attention into `online-softmax` calls, which are not ours. A
  Pallas call's metadata names the `pallas_call` it was lowered from; XLA's name their rewrite."""
  count, start = 0, hlo_text.find(_TPU_CUSTOM_CALL)
  while start >= 0:
    end = _INSTRUCTION_END.search(hlo_text, start)
    stop = end.start() if end else len(hlo_text)
    count += bool(_PALLAS_OP.search(hlo_text, start, stop))
    start = hlo_text.find(_TPU_CUSTOM_CALL, stop)
  return count


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
  total = flop_count.dit_train_flops(cfg, int(config.train.global_batch_size),
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
  total = flop_count.dit_train_flops(cfg, b, (h, w), cap_len)
  layers_forward = b * cfg.n_layers * (
      2 * s * flop_count.block_matmul_params(cfg) + 4 * cfg.n_heads * cfg.head_dim * s * s
      + 2 * cfg.adaln_dim * 4 * cfg.dim)
  return total / (total + layers_forward)


def describe(config, mesh) -> dict[str, Any]:
  shape = dict(zip(parallel.MESH_AXES, mesh.devices.shape))
  b = int(config.train.global_batch_size)
  micro = int(config.train.micro_batches)
  shards = parallel.batch_axis_size(mesh)
  return {"mesh": shape, "devices": mesh.devices.size, "global_batch": b, "micro_batches": micro,
          "per_device_micro_batch": b // micro / shards,
          "remat": _remat(config), "n_layers": int(config.model.n_layers),
          "attention": _attention(config, mesh),
          "activation_dtype": config.model.activation_dtype,
          "layer_loop": _layer_loop(config, mesh)}


def _remat(config) -> str:
  """The policy compiled: "auto" is the trainer's choice from a device's memory; a program built
  without that choice (this tool's) remats fully."""
  policy = config.model.remat_policy
  return "full (auto unresolved)" if policy == nextdit.AUTO else policy


def _attention(config, mesh) -> str:
  """The attention backend the step compiles to on `mesh` ("auto" resolved for its platform)."""
  backend = config.model.attention_backend
  if backend == "auto":
    cfg = config_lib.nextdit_config(config)
    with parallel.use_mesh(mesh):
      return layers.auto_backend(cfg.head_dim, cfg.compute_dtype, plain=True) + " (auto)"
  if backend == "splash" and mesh_platform(mesh) == "cpu":
    return "splash (Pallas interpret mode on CPU: not the TPU kernel's program)"
  return backend


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
  gen = chip_specs.TPU_GENERATIONS[generation]
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
    return chip_specs.TPU_GENERATIONS[self.generation].hbm_gib * GIB

  @property
  def peak_flops(self) -> float:
    return chip_specs.PEAK_TFLOPS[self.generation] * 1e12

  def devices(self) -> list:
    """The slices' devices from libtpu's topology description (no TPU needed)."""
    # libtpu takes a machine-wide lock file unless told otherwise; these processes only compile,
    # so several may load it at once (a test beside a running aot_compile.py).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    gen = chip_specs.TPU_GENERATIONS[self.generation]
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
    raise input_errors.InputError(
        f"bad TPU target {text!r}: expected [<slices>x]<generation>-<size>, e.g. v5e-256, "
        f"v5p-128, 2xv5e-256, generations {sorted(chip_specs.TPU_GENERATIONS)}")
  slices, generation, size = int(m.group(1) or 1), m.group(2), int(m.group(3))
  generation = "v5e" if generation == "v5litepod" else generation
  gen = chip_specs.TPU_GENERATIONS[generation]
  shapes = slice_shapes(generation)
  chips, rem = divmod(size, gen.cores_per_chip)
  if rem or chips not in shapes or slices < 1:
    sizes = ", ".join(str(c * gen.cores_per_chip) for c in sorted(shapes))
    raise input_errors.InputError(
        f"bad TPU target {text!r}: {generation} slices are {generation}-N with N in {sizes}"
        + (" (TensorCores, 2 a chip)" if gen.cores_per_chip > 1 else "")
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
               peak_tflops=chip_specs.PEAK_TFLOPS[target.generation])
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
  if target is not None:  # Pallas kernels (splash attention) in the compiled program
    out["pallas_calls"] = pallas_calls(compiled.as_text())
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


# ----------------------------------------------------------------------------- one compile run

# Fake CPU devices without a mesh given: FSDP over 8 and 64 devices, 4 x 64 over 256 (the 2B
# model's layouts of docs/performance.md, "Scale on paper"); any other count is all FSDP.
FAKE_DEVICE_MESHES = {8: (1, 8, 1), 64: (1, 64, 1), 256: (4, 64, 1)}


# The training loop's checks of a config, with the DiT task's own left out: they are about its
# record dataset, which a compile never reads (the model's fields are checked when the step is
# built).
_COMPILE_TASK = dataclasses.replace(dit_task.TASK, config_problems=lambda config, processes: [])


def compile_here(fake_devices: int = 0) -> None:
  """Sets this process up to compile only: JAX on the CPU unless JAX_PLATFORMS names another
  platform (XLA:TPU compiles through libtpu's topology, no TPU needed), `fake_devices` CPU
  devices when > 0, and no persistent compilation cache (compile times are part of the report,
  and nothing compiled here runs). Call it before JAX's first device query."""
  if fake_devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={fake_devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # for the processes this one starts
  if not jax.config.jax_platforms:  # JAX read the environment when it was imported
    jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
  jax.config.update("jax_enable_compilation_cache", False)


def with_settings(config, settings: dict[str, Any]):
  """`config` with the dotted fields of `settings` ("train.micro_batches": 4) set; a value of 0 or
  "" (a flag not given) leaves its field as the config has it."""
  for path, value in settings.items():
    if value:
      config_path.set_value(path, config, value)
  return config


def parse_mesh(text: str) -> tuple[int, ...]:
  """'data,fsdp,tensor' sizes ("1,64,1"; one may be -1) -> a tuple; anything else one line."""
  try:
    shape = tuple(int(v) for v in text.split(","))
  except ValueError:
    shape = ()
  if len(shape) != len(parallel.MESH_AXES):
    raise input_errors.InputError(f"mesh {text!r}: expected {len(parallel.MESH_AXES)} integers "
                                  f"{','.join(parallel.MESH_AXES)}, e.g. 1,64,1")
  return shape


def slice_sizes(config, *, target: TpuTarget | None = None, fake_devices: int = 0,
                mesh: str = "") -> dict[str, int]:
  """The mesh's axis sizes on one slice (all the devices without a target): `mesh` given as
  data,fsdp,tensor for the whole mesh (data divisible by the slices), else on a target the
  config's mesh for each slice, else `FAKE_DEVICE_MESHES` on `fake_devices`."""
  slices = target.num_slices if target else 1
  if mesh:
    shape = parse_mesh(mesh)
    if shape[0] % slices:
      raise input_errors.InputError(f"mesh {mesh!r}: the data axis {shape[0]} is not divisible "
                                    f"by the {slices} slices of {target.name}")
    return dict(zip(parallel.MESH_AXES, (shape[0] // slices,) + shape[1:]))
  if target:
    return dict(config.mesh)
  return dict(zip(parallel.MESH_AXES, FAKE_DEVICE_MESHES.get(fake_devices,
                                                             (1, fake_devices, 1))))


def _resolved(sizes: dict[str, int], devices: int) -> tuple[int, ...]:
  try:
    return parallel.mesh_shape(sizes, devices)
  except ValueError as e:
    raise input_errors.InputError(str(e)) from None


def compile_mesh(config, *, target: TpuTarget | None = None, fake_devices: int = 0,
                 mesh: str = ""):
  """The mesh to compile on: `target`'s slices (`tpu_mesh`) or this process's devices, laid out
  by `slice_sizes`; a layout that does not fit the devices raises one line."""
  sizes = slice_sizes(config, target=target, fake_devices=fake_devices, mesh=mesh)
  if target:
    _resolved(sizes, target.chips)
    return tpu_mesh(target, sizes)
  _resolved(sizes, jax.device_count())
  return parallel.make_mesh(sizes)


def per_device_step_batch(config, target: TpuTarget, mesh: str = "") -> int:
  """Samples per device per optimizer step on `target` (nothing built or compiled): the global
  batch over the batch shards (data x fsdp) of the mesh `compile_mesh` would lay out."""
  shape = _resolved(slice_sizes(config, target=target, mesh=mesh), target.chips)
  return int(config.train.global_batch_size) // (shape[0] * target.num_slices * shape[1])


def check_config(config, mesh) -> None:
  """The training loop's checks of `config` on `mesh` (`loop.validate_config`: the mesh, the
  global batch over micro-batches and batch shards, the train section's ranges): a one-line
  `loop.ConfigError`."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.train.init_from = ""  # a compile reads no weights: the run's path need not exist here
  loop.validate_config(config, _COMPILE_TASK, num_devices=mesh.devices.size, process_count=1)


def fit_to_mesh(config, mesh, *, per_device_batch: int = 0):
  """`config` made to train on `mesh`: its mesh the mesh's shape, its micro-batches those that
  give `per_device_batch` samples per device (when > 0), checked (`check_config`)."""
  with config.unlocked():
    config.mesh.update(dict(zip(parallel.MESH_AXES, mesh.devices.shape)))
    if per_device_batch:
      per_step = int(config.train.global_batch_size) // parallel.batch_axis_size(mesh)
      if per_step % per_device_batch:
        raise input_errors.InputError(
            f"{per_step} samples per device per step are not a multiple of --per_device_batch "
            f"{per_device_batch}")
      config.train.micro_batches = per_step // per_device_batch
  check_config(config, mesh)
  return config


def compile_report(config, *, target: str = "", fake_devices: int = 0, mesh: str = "",
                   per_device_batch: int = 0, cap_len: int = 0, flops: bool = False
                   ) -> dict[str, Any]:
  """One run of launch/aot_compile.py: `config`'s step compiled for the TPU `target` (a Cloud
  accelerator type) or this process's `fake_devices` CPU devices, on the mesh `compile_mesh`
  lays out, with captions padded to `cap_len` (0: data.max_caption_len); `step_report`'s dict."""
  tpu = tpu_target(target) if target else None
  device_mesh = compile_mesh(config, target=tpu, fake_devices=fake_devices, mesh=mesh)
  fit_to_mesh(config, device_mesh, per_device_batch=per_device_batch)
  return step_report(config, device_mesh, cap_len=cap_len or int(config.data.max_caption_len),
                     target=tpu, flops=flops)


def gib_text(b: float) -> str:
  return f"{b / GIB:.2f}"


def report_lines(r: dict[str, Any]) -> list[str]:
  """`step_report`'s dict (with the config's name, variant and n_layers_config) as text lines."""
  where = (f"{r['target']} ({r['devices']} chips, {r['device_kind']}, {r['topology']})"
           if r.get("target") else f"{r['devices']} fake CPU devices")
  lines = [f"{r['config']}:{r['variant']} on {where}"]
  attention = r["attention"]
  if "pallas_calls" in r:
    attention += f" ({r['pallas_calls']} Pallas kernel calls)"
  lines.append(
      f"  mesh {r['mesh']} remat {r['remat']} attention {attention} activations "
      f"{r['activation_dtype']} layers ({r['layer_loop']}) "
      f"{r['n_layers']}/{r['n_layers_config']} | global batch {r['global_batch']} = "
      f"{r['micro_batches']} micro x {r['per_device_micro_batch']:g} per device | latent "
      f"{r['latent_hw']} caption {r['cap_len']} | compile {r['compile_s']} s")
  m = r.get("memory")
  if m:
    rows = [("params", m["params"]), ("opt_state", m["opt_state"]), ("ema", m["ema"]),
            ("arguments", m["arguments"]), ("outputs", m["outputs"]),
            ("aliased", m["aliased"]), ("temporaries", m["temp"])]
    rows += [(k, m[k]) for k in ("xla_peak", "program") if k in m] + [("peak total", m["total"])]
    lines.append("  per device GiB   " + " ".join(f"{k:>11}" for k, _ in rows))
    lines.append("                   " + " ".join(f"{gib_text(v):>11}" for _, v in rows))
  if "fits" in r:
    verdict = "FITS" if r["fits"] else "DOES NOT FIT"
    used = (f"{gib_text(m['total'])} of the {gib_text(r['hbm'])} GiB of HBM XLA:TPU allows "
            f"({100 * r['hbm_used']:.0f}%)" if m else r.get("error", ""))
    lines.append(f"  verdict: {verdict}: {used}")
  if "xla_flops_scanned" in r:
    line = (f"  per device FLOPs: analytic {r['analytic_flops']:.4e}; XLA as counted (loop bodies "
            f"once) {r['xla_flops_scanned']:.4e}")
    if "xla_flops" in r:
      line += (f"; XLA unrolled {r['xla_flops']:.4e}; analytic/XLA {r['analytic_over_xla']:.3f} "
               f"(remat alone would give {r['expected_from_remat']:.3f})")
    lines.append(line)
  if r.get("ideal_step_s"):
    lines.append(f"  step time at the chip's peak ({r['peak_tflops']:g} TFLOP/s, analytic "
                 f"FLOPs): {r['ideal_step_s']:.3f} s")
  return lines
