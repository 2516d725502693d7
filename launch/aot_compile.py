"""Compile (never run) the 2.6B DiT train step for a simulated pod; print per-device memory/FLOPs.

One combination (its own process: the fake device count is fixed when jax is imported):

  python launch/aot_compile.py --devices 8 --variant stage1_256 --micro-batches 8
  python launch/aot_compile.py --devices 256 --mesh 4,64,1 --variant stage3_1024 --remat dots

Driver mode runs every combination (variants x device counts) as subprocesses and prints a table:

  python launch/aot_compile.py --all [--devices-list 8,64,256] [--variants stage1_256,...]

Printed per device: parameter, optimizer-state, EMA and temporary bytes (`memory_analysis()`),
XLA's FLOPs (`cost_analysis()`; with --flops the layer and micro-batch loops are unrolled by
extrapolation, see svg_jax/train/aot.py), our analytic FLOPs (svg_jax/train/metrics.py, the MFU
numerator) and their ratio. --n-layers compiles a shorter stack (documented as such in the output).
Inputs are abstract (ShapeDtypeStructs with shardings): nothing is allocated.
"""
import argparse
import json
import os
import subprocess
import sys
import time

DEFAULT_MESH = {8: (1, 8, 1), 64: (1, 64, 1), 256: (4, 64, 1)}
VARIANTS = ("stage1_256", "stage2_512", "stage3_1024")
CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                           "svg_t2i_2b.py")


def _parser():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", type=int, default=8, help="fake CPU devices (one process each)")
  p.add_argument("--mesh", default="", help="data,fsdp,tensor (default: by device count)")
  p.add_argument("--variant", default="stage1_256", help="configs/svg_t2i_2b.py variant")
  p.add_argument("--config", default=CONFIG_FILE, help="config file with get_config(variant)")
  p.add_argument("--micro-batches", type=int, default=0,
                 help="gradient-accumulation steps (0: the config's value)")
  p.add_argument("--per-device-batch", type=int, default=0,
                 help="samples per device per micro-batch; sets micro-batches (0: unused)")
  p.add_argument("--global-batch", type=int, default=0, help="0: the config's (official 512)")
  p.add_argument("--remat", default="", help="none | full | dots | dots_no_batch (default: config)")
  p.add_argument("--n-layers", type=int, default=0, help="compile a shorter stack (0: config)")
  p.add_argument("--cap-len", type=int, default=0, help="padded caption length (0: largest bucket)")
  p.add_argument("--flops", action="store_true",
                 help="also compile unrolled 1- and 2-layer steps for XLA's full-step FLOPs")
  p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
  p.add_argument("--all", action="store_true", help="driver: run every combination")
  p.add_argument("--devices-list", default="8,64,256")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--timeout", type=int, default=3600, help="driver: seconds per combination")
  return p


def _load_config(path, variant):
  import importlib.util
  spec = importlib.util.spec_from_file_location("aot_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def run_one(args) -> dict:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # noqa: F401  (after XLA_FLAGS)
  from absl import logging as absl_logging
  from svg_jax import parallel
  from svg_jax.train import aot

  absl_logging.set_verbosity(absl_logging.ERROR)  # the empty-prompt stand-in warning is expected
  config = _load_config(args.config, args.variant)
  mesh_shape = (tuple(int(v) for v in args.mesh.split(",")) if args.mesh
                else DEFAULT_MESH.get(args.devices, (1, args.devices, 1)))
  with config.unlocked():
    config.mesh.update(dict(zip(parallel.MESH_AXES, mesh_shape)))
    if args.micro_batches:
      config.train.micro_batches = args.micro_batches
    if args.global_batch:
      config.train.global_batch_size = args.global_batch
    if args.remat:
      config.model.remat_policy = args.remat
    if args.n_layers:
      config.model.n_layers = args.n_layers
  mesh = parallel.make_mesh(dict(config.mesh))
  shards = parallel.batch_axis_size(mesh)
  if args.per_device_batch:
    per_step = int(config.train.global_batch_size) // shards
    if per_step % args.per_device_batch:
      raise SystemExit(f"{per_step} samples per device per step are not a multiple of "
                       f"--per-device-batch {args.per_device_batch}")
    with config.unlocked():
      config.train.micro_batches = per_step // args.per_device_batch
  gb, micro = int(config.train.global_batch_size), int(config.train.micro_batches)
  if gb % micro or (gb // micro) % shards:
    raise SystemExit(f"global batch {gb} / micro_batches {micro} is not divisible by the "
                     f"{shards} batch shards of mesh {mesh_shape}")
  cap_len = args.cap_len or int(config.data.max_caption_len)
  compiled, setup, seconds = aot.compile_step(config, mesh, cap_len=cap_len)
  out = aot.describe(config, mesh)
  out.update(variant=args.variant, cap_len=cap_len,
             latent_hw=aot.latent_hw(config), compile_s=round(seconds, 1),
             n_layers_config=int(_load_config(args.config, args.variant).model.n_layers))
  out["memory"] = aot.memory_report(compiled, setup)
  out["xla_flops_scanned"] = aot.cost_flops(compiled)
  out["analytic_flops"] = aot.analytic_flops_per_device(config, mesh, cap_len=cap_len)
  if args.flops:
    f = aot.xla_step_flops(config, mesh, cap_len=cap_len)
    out["xla_flops"] = f["total"]
    out["xla_flops_per_layer"] = f["per_layer"]
    out["flops_compile_s"] = round(f["seconds"], 1)
    out["analytic_over_xla"] = out["analytic_flops"] / f["total"]
    out["expected_from_remat"] = aot.remat_expected_ratio(config, cap_len=cap_len)
  return out


def _gib(b):
  return f"{b / 2 ** 30:8.2f}"


def print_one(r: dict) -> None:
  m = r["memory"]
  print(f"{r['variant']} mesh {r['mesh']} ({r['devices']} devices) remat {r['remat']} "
        f"layers {r['n_layers']}/{r['n_layers_config']} global batch {r['global_batch']} = "
        f"{r['micro_batches']} x micro, {r['per_device_micro_batch']:g} per device per micro | "
        f"latent {r['latent_hw']} caption {r['cap_len']} | compile {r['compile_s']} s")
  print(f"  per device GiB: params {_gib(m['params'])} opt_state {_gib(m['opt_state'])} "
        f"ema {_gib(m['ema'])} args {_gib(m['arguments'])} temp {_gib(m['temp'])} "
        f"peak {_gib(m['total'])}")
  line = (f"  per device FLOPs: analytic {r['analytic_flops']:.4e}; XLA as counted (loop bodies "
          f"once) {r['xla_flops_scanned']:.4e}")
  if "xla_flops" in r:
    line += (f"; XLA unrolled {r['xla_flops']:.4e}; analytic/XLA {r['analytic_over_xla']:.3f} "
             f"(remat alone would give {r['expected_from_remat']:.3f})")
  print(line)


def driver(args) -> int:
  rows, failed = [], []
  for variant in args.variants.split(","):
    for devices in (int(v) for v in args.devices_list.split(",")):
      cmd = [sys.executable, os.path.abspath(__file__), "--devices", str(devices), "--variant",
             variant, "--json", "--config", args.config]
      for flag, value in (("--micro-batches", args.micro_batches),
                          ("--per-device-batch", args.per_device_batch), ("--remat", args.remat),
                          ("--n-layers", args.n_layers), ("--cap-len", args.cap_len),
                          ("--global-batch", args.global_batch)):
        if value:
          cmd += [flag, str(value)]
      if args.flops:
        cmd.append("--flops")
      start = time.perf_counter()
      try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
      except subprocess.TimeoutExpired:
        failed.append(f"{variant} x {devices}: over {args.timeout} s")
        print(f"{variant} x {devices}: timed out after {args.timeout} s", flush=True)
        continue
      if proc.returncode:
        failed.append(f"{variant} x {devices}: exit {proc.returncode}")
        print(f"{variant} x {devices}: failed\n{proc.stderr[-3000:]}", flush=True)
        continue
      r = json.loads(proc.stdout.strip().splitlines()[-1])
      r["wall_s"] = round(time.perf_counter() - start, 1)
      rows.append(r)
      print_one(r)
      print(f"  (process wall time {r['wall_s']} s)")
      print("  json " + json.dumps(r), flush=True)
  if failed:
    print("failed: " + "; ".join(failed))
  return 1 if failed else 0


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  if args.all:
    return driver(args)
  r = run_one(args)
  if args.json:
    print(json.dumps(r))
  else:
    print_one(r)
  return 0


if __name__ == "__main__":
  sys.exit(main())
