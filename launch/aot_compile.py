"""Compile (never run) a DiT train step for a TPU slice or a simulated pod; print per-device memory.

TPU slices, on any machine (libtpu's topology description; XLA:TPU compiles, no TPU is used):

  python launch/aot_compile.py --config configs/svg_t2i_2b.py:stage1_256 --target v5e-256
  python launch/aot_compile.py --config configs/svg_t2i_2b.py:stage3_1024 --target 2xv5p-128 \\
      --per_device_batch 1

--target is Cloud's accelerator type: v5e-N / v6e-N (N chips: 1, 4, 8, ..., 256), v4-N / v5p-N (N
TensorCores, 2 a chip: v5p-128 is 64 chips), with "Kx" in front for K slices over the data-centre
network. Without --mesh the config's mesh lays out each slice and the data axis is multiplied
across slices (configs/svg_t2i_2b.py: FSDP over a slice's chips, data across slices). Attention
backend "auto" (the 2B config's) compiles the Pallas splash kernel for TPUs.

Fake CPU devices (for GPU clusters; one process each, the device count is fixed at jax import):

  python launch/aot_compile.py --devices 8 --config configs/svg_t2i_2b.py:stage1_256 \\
      --micro_batches 8
  python launch/aot_compile.py --devices 256 --mesh 4,64,1 --variant stage3_1024 --remat dots

Driver mode runs each combination as a subprocess and prints its lines:

  python launch/aot_compile.py --all [--devices_list 8,64,256 | --targets v5e-8,v6e-64] \\
      [--variants stage1_256,...]
  python launch/aot_compile.py --fit --targets v5e-64 --variants stage2_512 [--remats dots,full]
      (the largest micro-batch per device that fits, for the first remat policy that fits)

Printed per device: parameter, optimizer-state, EMA, argument, output and temporary bytes
(`memory_analysis()`), the peak against the chip's HBM and a fit verdict (TPU targets), XLA's
FLOPs (`cost_analysis()`; with --flops the layer and micro-batch loops are unrolled by
extrapolation, see svg_jax/train/aot.py), our analytic FLOPs (svg_jax/train/metrics.py, the MFU
numerator), and the last line is the same as one JSON object. --n_layers compiles a shorter stack
(documented as such in the output). Inputs are abstract (ShapeDtypeStructs with shardings):
nothing is allocated. A bad target or config is one line on stderr (exit 2).
"""
import argparse
import json
import os
import subprocess
import sys
import time

DEFAULT_MESH = {8: (1, 8, 1), 64: (1, 64, 1), 256: (4, 64, 1)}
VARIANTS = ("stage1_256", "stage2_512", "stage3_1024")
REMAT_ORDER = ("none", "dots", "full")  # least recomputation first
CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                           "svg_t2i_2b.py")


def _parser():
  # Flags are spelt with underscores, as in the other launch scripts; the dashed spellings of
  # earlier versions still work.
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--target", default="", help="TPU slice(s): v5e-256, v5p-128, 2xv6e-64, ...")
  p.add_argument("--devices", type=int, default=8, help="fake CPU devices (without --target)")
  p.add_argument("--mesh", default="", help="data,fsdp,tensor (default: the config's per slice "
                 "on TPU targets, by device count on fake devices)")
  p.add_argument("--config", default=CONFIG_FILE, help="config file[:variant]")
  p.add_argument("--variant", default="", help="variant when --config has none")
  p.add_argument("--micro_batches", "--micro-batches", type=int, default=0,
                 help="gradient-accumulation steps (0: the config's value)")
  p.add_argument("--per_device_batch", "--per-device-batch", type=int, default=0,
                 help="samples per device per micro-batch; sets micro-batches (0: unused)")
  p.add_argument("--global_batch", "--global-batch", type=int, default=0,
                 help="0: the config's (official 512)")
  p.add_argument("--remat", default="", help="none | dots | dots_no_batch | save_qkv_attn | "
                 "offload_qkv_attn | full (default: the config's; auto compiles as full)")
  p.add_argument("--attention", default="", help="xla | splash | cudnn | auto (default: config)")
  p.add_argument("--activation_dtype", "--activation-dtype", default="",
                 help="float32 | compute (default: the config's)")
  p.add_argument("--layer_loop", "--layer-loop", default="",
                 help="scan | unrolled | auto (default: the config's; auto is a scan on TPUs)")
  p.add_argument("--n_layers", "--n-layers", type=int, default=0,
                 help="compile a shorter stack (0: config)")
  p.add_argument("--cap_len", "--cap-len", type=int, default=0,
                 help="padded caption length (0: largest bucket)")
  p.add_argument("--flops", action="store_true",
                 help="also compile unrolled 1- and 2-layer steps for XLA's full-step FLOPs")
  p.add_argument("--json", action="store_true", help="print only the JSON line")
  p.add_argument("--all", action="store_true", help="driver: run every combination")
  p.add_argument("--fit", action="store_true",
                 help="driver: per target and variant, the largest micro-batch that fits")
  p.add_argument("--devices_list", "--devices-list", default="8,64,256")
  p.add_argument("--targets", default="", help="driver: TPU targets instead of --devices_list")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--remats", default=",".join(REMAT_ORDER), help="--fit: policies to try")
  p.add_argument("--timeout", type=int, default=3600, help="driver: seconds per combination")
  return p


def _load_config(spec, variant=""):
  import importlib.util
  path, _, spec_variant = spec.partition(":")
  variant = spec_variant or variant
  module_spec = importlib.util.spec_from_file_location("aot_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return (module.get_config(variant) if variant else module.get_config()), variant


def run_one(args) -> dict:
  if not args.target:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
  # TPU targets need no TPU: the topology comes from libtpu, the process runs on the CPU.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # noqa: F401  (after XLA_FLAGS)
  from svg_jax import parallel
  from svg_jax.train import aot

  target = aot.tpu_target(args.target) if args.target else None
  config, variant = _load_config(args.config, args.variant)
  n_layers_config = int(config.model.n_layers)
  slices = target.num_slices if target else 1
  if args.mesh:
    mesh_shape = tuple(int(v) for v in args.mesh.split(","))
    if len(mesh_shape) != len(parallel.MESH_AXES) or mesh_shape[0] % slices:
      raise ValueError(f"--mesh {args.mesh}: expected data,fsdp,tensor with data divisible by "
                       f"the {slices} slices")
    sizes = dict(zip(parallel.MESH_AXES, (mesh_shape[0] // slices,) + mesh_shape[1:]))
  elif target:
    sizes = dict(config.mesh)
  else:
    sizes = dict(zip(parallel.MESH_AXES, DEFAULT_MESH.get(args.devices, (1, args.devices, 1))))
  with config.unlocked():
    if args.micro_batches:
      config.train.micro_batches = args.micro_batches
    if args.global_batch:
      config.train.global_batch_size = args.global_batch
    if args.remat:
      config.model.remat_policy = args.remat
    if args.attention:
      config.model.attention_backend = args.attention
    if args.activation_dtype:
      config.model.activation_dtype = args.activation_dtype
    if args.layer_loop:
      config.model.layer_loop = args.layer_loop
    if args.n_layers:
      config.model.n_layers = args.n_layers
  mesh = aot.tpu_mesh(target, sizes) if target else parallel.make_mesh(sizes)
  with config.unlocked():
    config.mesh.update(dict(zip(parallel.MESH_AXES, mesh.devices.shape)))
  shards = parallel.batch_axis_size(mesh)
  if args.per_device_batch:
    per_step = int(config.train.global_batch_size) // shards
    if per_step % args.per_device_batch:
      raise ValueError(f"{per_step} samples per device per step are not a multiple of "
                       f"--per_device_batch {args.per_device_batch}")
    with config.unlocked():
      config.train.micro_batches = per_step // args.per_device_batch
  gb, micro = int(config.train.global_batch_size), int(config.train.micro_batches)
  if gb % micro or (gb // micro) % shards:
    raise ValueError(f"global batch {gb} / micro_batches {micro} is not divisible by the "
                     f"{shards} batch shards of mesh {tuple(mesh.devices.shape)}")
  cap_len = args.cap_len or int(config.data.max_caption_len)
  out = aot.step_report(config, mesh, cap_len=cap_len, target=target, flops=args.flops)
  out.update(variant=variant, config=os.path.basename(args.config.partition(":")[0]),
             n_layers_config=n_layers_config)
  return out


def _gib(b):
  return f"{b / 2 ** 30:.2f}"


def print_one(r: dict) -> None:
  where = (f"{r['target']} ({r['devices']} chips, {r['device_kind']}, {r['topology']})"
           if r.get("target") else f"{r['devices']} fake CPU devices")
  print(f"{r['config']}:{r['variant']} on {where}")
  attention = r["attention"]
  if "pallas_calls" in r:
    attention += f" ({r['pallas_calls']} Pallas kernel calls)"
  print(f"  mesh {r['mesh']} remat {r['remat']} attention {attention} activations "
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
    print("  per device GiB   " + " ".join(f"{k:>11}" for k, _ in rows))
    print("                   " + " ".join(f"{_gib(v):>11}" for _, v in rows))
  if "fits" in r:
    verdict = "FITS" if r["fits"] else "DOES NOT FIT"
    used = (f"{_gib(m['total'])} of the {_gib(r['hbm'])} GiB of HBM XLA:TPU allows "
            f"({100 * r['hbm_used']:.0f}%)" if m else r.get("error", ""))
    print(f"  verdict: {verdict}: {used}")
  if "xla_flops_scanned" in r:
    line = (f"  per device FLOPs: analytic {r['analytic_flops']:.4e}; XLA as counted (loop bodies "
            f"once) {r['xla_flops_scanned']:.4e}")
    if "xla_flops" in r:
      line += (f"; XLA unrolled {r['xla_flops']:.4e}; analytic/XLA {r['analytic_over_xla']:.3f} "
               f"(remat alone would give {r['expected_from_remat']:.3f})")
    print(line)
  if r.get("ideal_step_s"):
    print(f"  step time at the chip's peak ({r['peak_tflops']:g} TFLOP/s, analytic FLOPs): "
          f"{r['ideal_step_s']:.3f} s")


def _child(args, extra) -> list:
  cmd = [sys.executable, os.path.abspath(__file__), "--json", "--config", args.config]
  if args.variant:
    cmd += ["--variant", args.variant]
  for flag, value in (("--micro_batches", args.micro_batches), ("--remat", args.remat),
                      ("--per_device_batch", args.per_device_batch), ("--mesh", args.mesh),
                      ("--n_layers", args.n_layers), ("--cap_len", args.cap_len),
                      ("--global_batch", args.global_batch), ("--attention", args.attention),
                      ("--activation_dtype", args.activation_dtype),
                      ("--layer_loop", args.layer_loop)):
    if value and flag not in extra:
      cmd += [flag, str(value)]
  if args.flops:
    cmd.append("--flops")
  for flag, value in extra.items():
    cmd += [flag, str(value)]
  return cmd


def _run_child(args, extra, label):
  start = time.perf_counter()
  try:
    proc = subprocess.run(_child(args, extra), capture_output=True, text=True,
                          timeout=args.timeout)
  except subprocess.TimeoutExpired:
    print(f"{label}: timed out after {args.timeout} s", flush=True)
    return None
  if proc.returncode:
    print(f"{label}: failed\n{proc.stderr[-3000:]}", flush=True)
    return None
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  r["wall_s"] = round(time.perf_counter() - start, 1)
  return r


def _combinations(args):
  base, _, variant = args.config.partition(":")
  variants = [variant] if variant else args.variants.split(",")
  where = ([("--target", t) for t in args.targets.split(",")] if args.targets else
           [("--devices", d) for d in args.devices_list.split(",")])
  for v in variants:
    for flag, value in where:
      yield f"{base}:{v}", {flag: value}, f"{v} x {value}"


def driver(args) -> int:
  failed = []
  for config, extra, label in _combinations(args):
    r = _run_child(argparse.Namespace(**dict(vars(args), config=config, variant="")), extra,
                   label)
    if r is None:
      failed.append(label)
      continue
    print_one(r)
    print(f"  (process wall time {r['wall_s']} s)")
    print("  json " + json.dumps(r), flush=True)
  if failed:
    print("failed: " + "; ".join(failed))
  return 1 if failed else 0


def _per_device_step_batch(args, config_spec, target_name) -> int:
  """Samples per device per optimizer step on a target (no compile): global batch / batch shards."""
  from svg_jax import parallel
  from svg_jax.train import aot

  target = aot.tpu_target(target_name)
  config, _ = _load_config(config_spec)
  if args.mesh:
    shape = [int(v) for v in args.mesh.split(",")]
  else:
    shape = list(parallel.mesh_shape(dict(config.mesh), target.chips))
    shape[0] *= target.num_slices
  gb = args.global_batch or int(config.train.global_batch_size)
  return gb // (shape[0] * shape[1])


def fit_driver(args) -> int:
  """Per target and variant: for each remat policy in --remats (least recomputation first), the
  largest power-of-two micro-batch per device that fits, halving from the whole per-device step
  batch; the first policy that fits at all is the row's recommendation."""
  if not args.targets:
    raise ValueError("--fit needs --targets")
  for config, extra, label in _combinations(args):
    start = _per_device_step_batch(args, config, extra["--target"])
    found = False
    for remat in args.remats.split(","):
      a = argparse.Namespace(**dict(vars(args), config=config, variant="", remat=remat,
                                    per_device_batch=0, micro_batches=0))
      per_device = start
      while per_device >= 1 and not found:
        r = _run_child(a, dict(extra, **{"--per_device_batch": per_device}),
                       f"{label} {remat} {per_device}/device")
        if r is not None:
          print(f"{label} remat {remat} {per_device}/device: "
                f"{'fits' if r.get('fits') else 'does not fit'} "
                f"({_gib(r['memory']['total']) if r.get('memory') else '-'} GiB)", flush=True)
          print("  json " + json.dumps(r), flush=True)
          found = bool(r.get("fits"))
        per_device //= 2
      if found:
        break  # less recomputation fits: the other policies would only be slower
    if not found:
      print(f"{label}: nothing fits with remat {args.remats}", flush=True)
  return 0


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.fit:
      return fit_driver(args)
    if args.all:
      return driver(args)
    r = run_one(args)
  except ValueError as e:
    print(f"aot_compile: {e}", file=sys.stderr)
    return 2
  if not args.json:
    print_one(r)
  print(json.dumps(r))
  return 0


if __name__ == "__main__":
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)  # the empty-prompt stand-in warning is expected
  sys.exit(main())
