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
- launch/aot_compile.py's logic, through svg_jax (aot.py, aot_sweep.py): the mesh a run lays out
  (the fake-device defaults, a given mesh split over the slices), --per_device_batch turned into
  micro-batches and the training loop's batch checks as one config-error line, the per-chip step
  batch a fit search starts from, the children's command lines (the --config.x overrides and
  flags given passed on, the driver's own not), the fit search's order (halving the batch; the
  first policy that fits ends it) and the driver's summary of failures, on fake child runs.
- The script itself: --all on 2 fake devices passes its overrides to the child; bad input (a
  missing config file, a bad mesh, a batch the micro-batches do not divide, --fit without
  targets) is one line and exit status 2, as is bench/loader.py's unknown shape.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from svg_jax import parallel
from svg_jax.input_errors import InputError
from svg_jax.models import nextdit
from svg_jax.train import aot, aot_sweep, dit_task, loop
import script_runs

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


# ------------------------------------------------------------------------ launch/aot_compile.py

def test_fake_device_meshes_and_given_meshes():
  tiny = _config("tiny")
  assert aot.slice_sizes(tiny, fake_devices=8) == dict(data=1, fsdp=8, tensor=1)
  assert aot.slice_sizes(tiny, fake_devices=256) == dict(data=4, fsdp=64, tensor=1)
  assert aot.slice_sizes(tiny, fake_devices=6) == dict(data=1, fsdp=6, tensor=1)
  assert aot.slice_sizes(tiny, fake_devices=8, mesh="2,2,2") == dict(data=2, fsdp=2, tensor=2)
  # On a target: the config's mesh per slice, or the given whole mesh split over the slices.
  two = aot.tpu_target("2xv5e-4")  # parsing only: no libtpu devices are built
  assert aot.slice_sizes(tiny, target=two) == dict(tiny.mesh)
  assert aot.slice_sizes(tiny, target=two, mesh="4,2,1") == dict(data=2, fsdp=2, tensor=1)
  for bad, fragment in (("1,2", "expected 3 integers"), ("a,b,c", "expected 3 integers"),
                        ("3,2,1", "not divisible by the 2 slices")):
    with pytest.raises(InputError, match=fragment) as e:
      aot.slice_sizes(tiny, target=two, mesh=bad)
    assert "\n" not in str(e.value)
  with pytest.raises(InputError, match="needs 16 devices"):
    aot.compile_mesh(tiny, mesh="1,16,1")  # 8 devices here


def test_a_run_is_fitted_to_its_mesh_and_checked_by_the_loops_rules():
  """--per_device_batch sets the micro-batches; a batch the mesh cannot split is the training
  loop's own config error (loop.validate_config), one line."""
  mesh = parallel.make_mesh(dict(data=1, fsdp=8, tensor=1))
  config = aot.with_settings(_config("tiny"), {"train.global_batch_size": 64,
                                               "model.remat_policy": "", "model.n_layers": 0})
  assert config.model.remat_policy == _config("tiny").model.remat_policy  # "": not given
  aot.fit_to_mesh(config, mesh, per_device_batch=2)
  assert config.train.micro_batches == 4 and dict(config.mesh) == dict(data=1, fsdp=8, tensor=1)
  with pytest.raises(InputError, match="8 samples per device per step are not a multiple of"):
    aot.fit_to_mesh(config, mesh, per_device_batch=3)
  aot.with_settings(config, {"train.micro_batches": 16})
  with pytest.raises(loop.ConfigError, match="not divisible by the 8 batch shards") as e:
    aot.fit_to_mesh(config, mesh)
  assert "\n" not in str(e.value) and e.value.kind == "config error"
  # The weights a run starts from live where it runs: a compile does not ask for them.
  aot.with_settings(config, {"train.micro_batches": 4, "train.init_from": "/nonexistent/run"})
  aot.fit_to_mesh(config, mesh)
  assert config.train.init_from == "/nonexistent/run"


def test_per_device_step_batch_is_the_meshs():
  config = _config("svg_t2i_2b", "stage2_512")  # global batch 512, FSDP over the slice
  assert aot.per_device_step_batch(config, aot.tpu_target("v5e-64")) == 8
  assert aot.per_device_step_batch(config, aot.tpu_target("2xv5e-64")) == 4  # data x 2 slices
  assert aot.per_device_step_batch(config, aot.tpu_target("v5e-64"), mesh="1,16,4") == 32


def _children(**flags):
  return aot_sweep.Children("aot_compile.py", "cfg.py", flags, timeout=5)


def test_combinations_and_child_commands():
  assert list(aot_sweep.combinations("c.py", variants=["a", "b"], targets=[],
                                     devices=["8", "64"])) == [
      ("c.py:a", {"devices": "8"}, "a x 8"), ("c.py:a", {"devices": "64"}, "a x 64"),
      ("c.py:b", {"devices": "8"}, "b x 8"), ("c.py:b", {"devices": "64"}, "b x 64")]
  # A config named with its variant is that variant only; targets replace device counts.
  assert list(aot_sweep.combinations("c.py:b", variants=["a"], targets=["v5e-8"],
                                     devices=["8"])) == [("c.py:b", {"target": "v5e-8"},
                                                          "b x v5e-8")]
  children = _children(remat="--remat=full", **{"config.train.lr": "--config.train.lr=0.1"})
  command = children.command("c.py:b", {"remat": "dots", "target": "v5e-8"})
  assert command[1:] == ["aot_compile.py", "--config=c.py:b", "--config.train.lr=0.1",
                         "--remat=dots", "--target=v5e-8", "--json"]


def test_forwarded_flags_are_the_given_ones_but_the_drivers():
  from absl import flags
  from ml_collections import config_flags
  argv = ["aot_compile.py", "--config", os.path.join(ROOT, "configs/tiny.py"),
          "--config.train.global_batch_size=8", "--remat", "dots", "--all", "--targets=v5e-8"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=argv)
  for name in ("remat", "attention"):
    flags.DEFINE_string(name, "", "", flag_values=values)
  flags.DEFINE_boolean("all", False, "", flag_values=values)
  flags.DEFINE_list("targets", [], "", flag_values=values)
  values(argv)
  assert aot_sweep.forwarded_flags(values) == {
      "config.train.global_batch_size": "--config.train.global_batch_size=8",
      "remat": "--remat=dots"}


def _fake_runs(fits_up_to):
  """A child runner: fits when remat and samples per device are within `fits_up_to`."""
  calls = []

  def run(command, label, timeout):
    flags = dict(arg[2:].split("=", 1) for arg in command[2:] if "=" in arg)
    calls.append((flags.get("target") or flags["devices"], flags.get("remat"),
                  int(flags.get("per_device_batch", 0))))
    if "bad" in label:
      return None
    per_device = int(flags.get("per_device_batch", 1))
    fits = per_device <= fits_up_to.get(flags.get("remat"), 0)
    return {"fits": fits, "memory": {"total": per_device * aot.GIB}, "wall_s": 1.0}

  return run, calls


def test_fit_halves_the_batch_and_stops_at_the_first_policy_that_fits(capsys):
  run, calls = _fake_runs({"dots": 2, "full": 8})
  config = _config("svg_t2i_2b")
  assert aot_sweep.fit(_children(), variants=["v1"], targets=["v5e-64"], remats=["dots", "full"],
                       config_of=lambda spec: config, run=run) == 0
  # 512 / 64 chips = 8 a chip first, halved until dots fits at 2; full is never tried.
  assert calls == [("v5e-64", "dots", 8), ("v5e-64", "dots", 4), ("v5e-64", "dots", 2)]
  out = capsys.readouterr().out
  assert "v1 x v5e-64 remat dots 4/device: does not fit (4.00 GiB)" in out
  assert "v1 x v5e-64 remat dots 2/device: fits (2.00 GiB)" in out
  run, calls = _fake_runs({})
  aot_sweep.fit(_children(), variants=["v1"], targets=["v5e-256"], remats=["dots", "full"],
                config_of=lambda spec: config, run=run)
  assert calls == [("v5e-256", "dots", 2), ("v5e-256", "dots", 1), ("v5e-256", "full", 2),
                   ("v5e-256", "full", 1)]
  assert "v1 x v5e-256: nothing fits with remat dots,full" in capsys.readouterr().out


def test_fit_needs_targets_and_known_policies():
  assert aot_sweep.remat_order([]) == list(nextdit.REMAT_POLICIES)  # least recomputation first
  with pytest.raises(InputError, match="not among"):
    aot_sweep.remat_order(["dots", "lots"])
  with pytest.raises(InputError, match="--fit needs --targets"):
    aot_sweep.fit(_children(), variants=["v1"], targets=[], remats=[], config_of=None)


def test_every_combination_is_printed_and_failures_named(capsys):
  run, calls = _fake_runs({})
  report = {"config": "c.py", "variant": "v", "devices": 8, "attention": "xla", "mesh": {},
            "remat": "full", "activation_dtype": "compute", "layer_loop": "scan", "n_layers": 2,
            "n_layers_config": 2, "global_batch": 8, "micro_batches": 1,
            "per_device_micro_batch": 1, "latent_hw": (2, 2), "cap_len": 8, "compile_s": 1.0}

  def run_or_fail(command, label, timeout):
    run(command, label, timeout)
    return None if "bad" in label else dict(report, wall_s=2.0)

  assert aot_sweep.every(_children(), variants=["good", "bad"], targets=[], devices=["8"],
                         run=run_or_fail) == 1
  out = capsys.readouterr().out
  assert "c.py:v on 8 fake CPU devices" in out and "(process wall time 2.0 s)" in out
  assert out.strip().splitlines()[-1] == "failed: bad x 8"


def test_the_script_runs_every_combination_with_the_flags_given():
  """--all starts one child per combination, which gets the config overrides and flags."""
  out = script_runs.run("aot_compile.py", "--all", "--config", "configs/tiny.py",
                        "--variants", "small", "--devices_list", "2",
                        "--config.train.global_batch_size=4", "--n_layers", "1",
                        timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  reports = [json.loads(line.split("json ", 1)[1]) for line in out.stdout.splitlines()
             if line.startswith("  json ")]
  assert len(reports) == 1
  r = reports[0]
  assert (r["variant"], r["devices"], r["global_batch"], r["n_layers"]) == ("small", 2, 4, 1)


@pytest.mark.parametrize("args, fragment", [
    (("--config", "configs/nope.py", "--target", "v5e-8"), "configs/nope.py"),
    (("--config", "configs/tiny.py", "--mesh", "1,2"), "expected 3 integers"),
    (("--config", "configs/tiny.py", "--devices", "4", "--micro_batches", "3"),
     "not divisible by train.micro_batches 3"),
    (("--fit", "--config", "configs/tiny.py"), "--fit needs --targets")])
def test_bad_input_is_one_line(args, fragment):
  script_runs.assert_one_line(script_runs.run("aot_compile.py", *args), fragment)


def test_loader_bench_refuses_unknown_shapes():
  out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "loader.py"), "--shapes",
                        "tiny,bogus"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  script_runs.assert_one_line(out, "--shapes tiny,bogus", "tiny, 2b")
