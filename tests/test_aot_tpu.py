"""The train step compiled by XLA:TPU for TPU slices on this CPU-only machine (libtpu's topology
description; nothing runs).

- Targets are Cloud accelerator types; libtpu builds one device per chip of the slice we name:
  v5e-8 / v6e-64 chips, v4-32 / v5p-128 TensorCores (16 / 64 chips); bad names are one line.
- The tiny DiT's step for a v5e-8 (mesh data 1, fsdp 4, tensor 2) and for two v5e-4 slices (data
  across the slices, FSDP within): every parameter, optimizer moment and EMA array of the
  compiled executable's input and output is sharded as the config's logical-axis rules say
  (Flax's reading of the rules on the parameters' logical names), and the large kernels are split
  over fsdp; the per-device memory figures are positive, the arguments hold at least the state's
  shards, and attention `auto` compiled to the Pallas splash kernel (Mosaic custom calls in the
  program, each counted as a Pallas call). Clipping, AdamW, the update and the EMA read the state
  in one pass: one fusion per parameter takes it, both moments and its EMA array.
- With the `xla` attention backend XLA:TPU writes Mosaic calls of its own (`online-softmax`):
  the report does not count them as Pallas kernels.
- The HBM table is XLA:TPU's: a program that needs more is refused with that figure, for every
  generation; a train step XLA refuses is reported as not fitting, with XLA's reason.
- On two slices each fsdp group of the mesh lies in one slice and the data axis spans both.
- The command line prints a fit verdict and one JSON line for a 2-slice target; --fit halves the
  per-chip batch of the config a child compiles (its --config.x overrides included) until a step
  fits; a bad target is one line (exit 2).
"""
import importlib.util
import json
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import script_runs

from svg_jax import config as config_lib
from svg_jax import parallel
from svg_jax.models import nextdit
from svg_jax.train import aot, chip_specs

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _module(path, name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _tiny(mesh_sizes):
  c = _module("configs/tiny.py", "cfg_tiny_tpu").get_config()
  c.model.update(dict(n_layers=2, attention_backend="auto", compute_dtype="bfloat16"))
  c.mesh.update(mesh_sizes)
  c.train.global_batch_size = 16
  return c


@pytest.mark.parametrize("name,chips,kind", [
    ("v5e-8", 8, "TPU v5 lite"), ("v6e-64", 64, "TPU v6 lite"), ("v4-32", 16, "TPU v4"),
    ("v5p-128", 64, "TPU v5"), ("2x v5e-16", 32, "TPU v5 lite")])
def test_targets_build_one_device_per_chip(name, chips, kind):
  target = aot.tpu_target(name)
  devices = target.devices()
  assert len(devices) == chips and {d.device_kind for d in devices} == {kind}
  assert {d.platform for d in devices} == {"tpu"}
  # The MFU peak of libtpu's own device kind is the generation's.
  assert chip_specs.detect_chip(devices[0]) == name.split()[-1].split("-")[0]


@pytest.mark.parametrize("name,chip", [
    ("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100_pcie"),
    ("NVIDIA H100 NVL", "h100_nvl"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA A100 80GB PCIe", "a100"), ("NVIDIA B200", "cpu"), ("Tesla V100-SXM2-16GB", "cpu")])
def test_cuda_device_names_map_to_their_peak(name, chip):
  """Names as jax's device_kind and torch.cuda.get_device_name give them; unknown: no MFU."""
  assert chip_specs.chip_of("gpu", name) == chip


@pytest.mark.parametrize("bad", ["v5e-100", "v5p-7", "v9-8", "v5e256", "3x", "v5e-512"])
def test_bad_target_is_one_line(bad):
  with pytest.raises(ValueError) as e:
    aot.tpu_target(bad)
  assert "\n" not in str(e.value) and repr(bad) in str(e.value)
  script_runs.assert_one_line(script_runs.run("aot_compile.py", "--target", bad),
                              "bad TPU target", repr(bad))


@pytest.mark.parametrize("generation", sorted(chip_specs.TPU_GENERATIONS))
def test_hbm_table_is_what_xla_tpu_allows(generation):
  """A program needing 128 GiB of temporaries per chip: XLA:TPU refuses it, naming its HBM."""
  target = aot.tpu_target(f"{generation}-{4 * chip_specs.TPU_GENERATIONS[generation].cores_per_chip}")
  mesh = jax.make_mesh((4,), ("x",), devices=target.devices())
  x = jax.ShapeDtypeStruct((4 * 2 ** 16, 2 ** 16), jnp.float32,
                           sharding=NamedSharding(mesh, P("x")))
  f = jax.jit(lambda a: jnp.sum(jnp.cos(jnp.concatenate([jnp.sin(a * i) for i in range(8)], 1)),
                                axis=1))
  with pytest.raises(Exception, match="available HBM") as e:
    f.lower(x).compile()
  available = float(re.search(r"available HBM \(([0-9.]+)G\)", str(e.value)).group(1))
  assert available == chip_specs.TPU_GENERATIONS[generation].hbm_gib


def test_a_step_xla_refuses_is_a_verdict():
  """The 2B stage-3 step with 128 samples per chip of a v5e-4: no fit, XLA's reason kept."""
  config = _module("configs/svg_t2i_2b.py", "cfg_2b_tpu").get_config("stage3_1024")
  target = aot.tpu_target("v5e-4")
  mesh = aot.tpu_mesh(target, dict(config.mesh))
  r = aot.step_report(config, mesh, cap_len=256, target=target)
  assert r["fits"] is False and r["memory"] is None and "15.75G" in r["error"]
  r.update(config="svg_t2i_2b.py", variant="stage3_1024", n_layers_config=26)
  assert "  verdict: DOES NOT FIT: RESOURCE_EXHAUSTED" in "\n".join(aot.report_lines(r))


def _logical_specs(config):
  """Every parameter's logical axis names, from the model's boxed abstract init."""
  cfg = config_lib.nextdit_config(config)
  boxed = nextdit.abstract_params(cfg)
  return nn.get_partition_spec(boxed)


def _check_state_shardings(compiled, setup, config, mesh):
  rules = parallel.axis_rules(config.axis_rules)
  specs = _logical_specs(config)
  # Flax's reading of the rules (in priority order, a mesh axis at most once per array).
  expected = jax.tree.map(
      lambda spec: NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(spec), rules)),
      specs, is_leaf=lambda x: isinstance(x, P))
  (state_in, *_), _ = compiled.input_shardings
  state_out = compiled.output_shardings[0]
  st = setup.abstract_state
  checked = 0
  structure = jax.tree.structure(st.params)
  for tree in (state_in, state_out):
    # params, the EMA and both AdamW moments (the param-shaped subtrees of the optimizer state)
    # carry the parameters' shardings.
    moments = [t for t in jax.tree.leaves(tree.opt_state,
                                          is_leaf=lambda t: jax.tree.structure(t) == structure)
               if jax.tree.structure(t) == structure]
    assert len(moments) == 2
    for got_tree in [tree.params, tree.ema_params] + moments:
      for got, want, shape in zip(jax.tree.leaves(got_tree), jax.tree.leaves(expected),
                                  jax.tree.leaves(st.params)):
        assert got.is_equivalent_to(want, len(shape.shape)), (got, want)
        checked += 1
  assert checked == 8 * len(jax.tree.leaves(st.params))
  # The rules really split the model: its large kernels are 1/fsdp per device.
  big = [x for x in jax.tree.leaves(st.params) if math.prod(x.shape) >= 2 ** 16]
  fsdp = mesh.shape["fsdp"]
  assert big and all(math.prod(x.sharding.shard_shape(x.shape)) * fsdp <= math.prod(x.shape)
                     for x in big)


def _check_memory_and_kernel(compiled, setup):
  mem = aot.memory_report(compiled, setup)
  for key in ("params", "opt_state", "ema", "arguments", "outputs", "xla_peak", "program"):
    assert mem[key] > 0, key
  assert mem["arguments"] >= aot.per_device_bytes(setup.abstract_state)
  assert mem["total"] > mem["arguments"]
  assert aot.cost_flops(compiled) > 0
  text = compiled.as_text()
  assert text.count('custom_call_target="tpu_custom_call"') > 0  # splash
  assert aot.pallas_calls(text) == text.count('custom_call_target="tpu_custom_call"')
  return mem


def _check_one_update_pass(compiled, setup, n_inputs):
  """Clip, AdamW, the parameter update and the EMA read each state array in one pass: for every
  parameter, one fusion of the compiled program takes the parameter, both moments and the EMA
  array and returns the four new arrays."""
  entry = compiled.as_text().split("\nENTRY ", 1)[1]
  number = {int(i): name for name, i in re.findall(r"%([\w.-]+) = \S+ parameter\((\d+)\)", entry)}
  leaves = jax.tree_util.tree_flatten_with_path(setup.abstract_state)[0]
  # The state's arrays come first, in tree order; jit drops inputs the step never reads (one
  # field of the batch), which come after them.
  assert len(leaves) < len(number) <= n_inputs
  paths = [jax.tree_util.keystr(path) for path, _ in leaves]

  def arrays(part):
    return [number[i] for i, p in enumerate(paths) if part in p]

  groups = list(zip(*(arrays(part) for part in (".params", ".mu", ".nu", ".ema_params"))))
  assert len(groups) == len(jax.tree.leaves(setup.abstract_state.params))
  # Copies into faster memory (copy-start/-done), copies and bitcasts pass an array on.
  source = {}
  for name, op, operand in re.findall(
      r"^\s*%([\w.-]+) = .*? (copy-start|copy-done|copy|bitcast)\(%([\w.-]+)\)", entry, re.M):
    source[name] = source.get(operand, operand)
  fusions = [(name, outputs, {source.get(o, o) for o in re.findall(r"%([\w.-]+)", operands)})
             for name, outputs, operands in re.findall(
                 r"^\s*(?:ROOT )?%([\w.-]+) = \((.*?)\) fusion\((.*?)\)", entry, re.M)]
  for group in groups:
    users = [(name, outputs) for name, outputs, operands in fusions if set(group) <= operands]
    assert len(users) == 1, (group, [u[0] for u in users])
    assert users[0][1].count("[") >= 4  # its new parameter, moments and EMA


def test_tiny_step_compiles_for_v5e_8():
  config = _tiny(dict(data=1, fsdp=4, tensor=2))
  target = aot.tpu_target("v5e-8")
  mesh = aot.tpu_mesh(target, dict(config.mesh))
  assert mesh.devices.shape == (1, 4, 2)
  compiled, setup, _ = aot.compile_step(config, mesh, cap_len=64)
  _check_state_shardings(compiled, setup, config, mesh)
  batch = aot.abstract_batch(config, mesh, cap_len=64)
  _check_one_update_pass(compiled, setup,
                         len(jax.tree.leaves((setup.abstract_state, batch))) + 1)  # + the rng
  mem = _check_memory_and_kernel(compiled, setup)
  assert aot.fit_report(mem, target)["fits"]


def test_tiny_step_compiles_for_two_slices():
  config = _tiny(dict(data=1, fsdp=-1, tensor=1))
  target = aot.tpu_target("2xv5e-4")
  mesh = aot.tpu_mesh(target, dict(config.mesh))
  assert mesh.devices.shape == (2, 4, 1)
  slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert (slice_of == np.arange(2)[:, None, None]).all()  # data across slices, fsdp within
  compiled, setup, _ = aot.compile_step(config, mesh, cap_len=64)
  _check_state_shardings(compiled, setup, config, mesh)
  _check_memory_and_kernel(compiled, setup)


@pytest.mark.parametrize("scan_layers,layer_loop,compiled", [
    (True, "auto", "scan"), (True, "unrolled", "unrolled"), (False, "auto", "unrolled")])
def test_the_report_names_the_loop_the_target_compiles(scan_layers, layer_loop, compiled):
  """On a TPU slice layer loop auto is the scan (unrolled only where it compiles for a GPU)."""
  config = _tiny(dict(data=1, fsdp=8, tensor=1))
  config.model.update(dict(scan_layers=scan_layers, layer_loop=layer_loop))
  mesh = aot.tpu_mesh(aot.tpu_target("v5e-8"), dict(config.mesh))
  assert aot.describe(config, mesh)["layer_loop"] == compiled


@pytest.mark.parametrize("target, attention", [("v5e-8", "splash (auto)"), (None, "xla (auto)")])
def test_the_report_names_the_attention_and_remat_the_target_compiles(target, attention):
  """"auto" attention is the platform's kernel where it applies (splash on a TPU slice, xla on
  CPU devices); "auto" remat, which the trainer resolves from a device's memory, compiles here as
  full recomputation, and the report says both instead of "auto"."""
  config = _tiny(dict(data=1, fsdp=8, tensor=1))
  config.model.update(dict(attention_backend="auto", remat_policy="auto"))
  mesh = (aot.tpu_mesh(aot.tpu_target(target), dict(config.mesh)) if target else
          parallel.make_mesh(dict(config.mesh)))
  report = aot.describe(config, mesh)
  assert (report["attention"], report["remat"]) == (attention, "full (auto unresolved)")


def test_xla_tpus_own_kernels_are_no_pallas_calls():
  """The `xla` backend's attention, which XLA:TPU rewrites into Mosaic calls of its own (with
  fp32 matmuls, as configs/tiny.py's; it leaves bf16 ones as they are)."""
  config = _tiny(dict(data=1, fsdp=8, tensor=1))
  config.model.update(dict(attention_backend="xla", remat_policy="dots", compute_dtype="float32"))
  mesh = aot.tpu_mesh(aot.tpu_target("v5e-8"), dict(config.mesh))
  text = aot.compile_step(config, mesh, cap_len=64)[0].as_text()
  assert 'metadata={op_name="online-softmax"' in text
  assert text.count('custom_call_target="tpu_custom_call"') > 0
  assert aot.pallas_calls(text) == 0


def test_cli_prints_verdict_and_json():
  run = script_runs.run("aot_compile.py", "--config", "configs/tiny.py", "--target", "2xv5e-4",
                        "--n_layers", "1", "--global_batch", "8", "--attention", "auto",
                        timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  out = run.stdout.strip().splitlines()
  r = json.loads(out[-1])
  assert r["target"] == "2xv5e-4" and r["devices"] == 8 and r["num_slices"] == 2
  assert r["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}  # tiny.py asks for data parallelism
  assert r["fits"] and 0 < r["memory"]["total"] < r["hbm"] and r["pallas_calls"] > 0
  assert any(line.strip().startswith("verdict: FITS") for line in out)


def test_fit_finds_the_largest_batch_a_chip_takes():
  """--fit on a v5e-4 with the global batch overridden to 8: the search starts from the 2
  samples a chip of the overridden config (8 / 4 chips) and the child compiles that config."""
  run = script_runs.run("aot_compile.py", "--fit", "--config", "configs/tiny.py:small",
                        "--config.train.global_batch_size=8", "--targets", "v5e-4",
                        "--remats", "dots", "--n_layers", "1", "--attention", "auto",
                        timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  lines = run.stdout.strip().splitlines()
  assert lines[0].startswith("small x v5e-4 remat dots 2/device: fits ("), lines
  r = json.loads(lines[1].split("json ", 1)[1])
  assert (r["global_batch"], r["micro_batches"], r["per_device_micro_batch"]) == (8, 1, 2)
  assert r["fits"] and r["pallas_calls"] > 0 and r["n_layers"] == 1
