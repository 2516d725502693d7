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

Fake CPU devices (a GPU cluster's layout and sharding; one process each, the device count is fixed
when JAX starts). XLA:CPU compiles them: "auto" gives the layer scan and xla attention, not a GPU's
unrolled layers and cuDNN, so their bytes check a layout, they are no GPU's figures (those are in
docs/performance.md):

  python launch/aot_compile.py --devices 8 --config configs/svg_t2i_2b.py:stage1_256 \\
      --micro_batches 8
  python launch/aot_compile.py --devices 256 --mesh 4,64,1 \\
      --config configs/svg_t2i_2b.py:stage3_1024 --remat dots

--config is a config file[:variant] (default configs/svg_t2i_2b.py, its stage 1) and takes
--config.x.y=v overrides, as in the other scripts; --remat, --per_device_batch and the other flags
below set their config fields over it.

Driver mode runs each combination as a subprocess and prints its lines (svg_jax/train/aot_sweep.py):

  python launch/aot_compile.py --all [--devices_list 8,64,256 | --targets v5e-8,v6e-64] \\
      [--variants stage1_256,...]
  python launch/aot_compile.py --fit --targets v5e-64 --variants stage2_512 [--remats dots,full]
      (the largest micro-batch per device that fits, for the first remat policy that fits;
      without --remats every policy, least recomputation first)

Printed per device: parameter, optimizer-state, EMA, argument, output and temporary bytes
(`memory_analysis()`), the peak against the chip's HBM and a fit verdict (TPU targets), the
Pallas kernel calls in the program (TPU targets), XLA's FLOPs (`cost_analysis()`; with --flops
the layer and micro-batch loops are unrolled by extrapolation, see svg_jax/train/aot.py), our
analytic FLOPs (svg_jax/train/flop_count.py, the MFU numerator), and the last line is the same as
one JSON object. --n_layers compiles a shorter stack (documented as such in the output). Inputs
are abstract (ShapeDtypeStructs with shardings): nothing is allocated. A bad flag, target, mesh
or config is one line on stderr (exit 2).
"""
import json
import os

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from svg_jax import cli

CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                           "svg_t2i_2b.py")
# Flags that set a config field (0 or "": the config's value).
FIELD_FLAGS = {"micro_batches": "train.micro_batches", "global_batch": "train.global_batch_size",
               "remat": "model.remat_policy", "attention": "model.attention_backend",
               "activation_dtype": "model.activation_dtype", "layer_loop": "model.layer_loop",
               "n_layers": "model.n_layers"}

cli.define_config_file("config", CONFIG_FILE, "config file[:variant]")
flags.DEFINE_string("target", "", "TPU slice(s): v5e-256, v5p-128, 2xv6e-64, ...")
flags.DEFINE_integer("devices", 8, "fake CPU devices (without --target)", lower_bound=1)
flags.DEFINE_string("mesh", "", "data,fsdp,tensor (default: the config's per slice on TPU "
                    "targets, by device count on fake devices)")
flags.DEFINE_integer("micro_batches", 0, "gradient-accumulation steps (0: the config's value)",
                     lower_bound=0)
flags.DEFINE_integer("per_device_batch", 0, "samples per device per micro-batch; sets "
                     "micro-batches (0: unused)", lower_bound=0)
flags.DEFINE_integer("global_batch", 0, "0: the config's (official 512)", lower_bound=0)
flags.DEFINE_string("remat", "", "a remat policy, one of nextdit.REMAT_POLICIES (default: the "
                    "config's; auto compiles as full)")
flags.DEFINE_string("attention", "", "xla | splash | cudnn | auto (default: the config's)")
flags.DEFINE_string("activation_dtype", "", "float32 | compute (default: the config's)")
flags.DEFINE_string("layer_loop", "", "scan | unrolled | auto (default: the config's; auto is a "
                    "scan on TPUs)")
flags.DEFINE_integer("n_layers", 0, "compile a shorter stack (0: the config's)", lower_bound=0)
flags.DEFINE_integer("cap_len", 0, "padded caption length (0: the largest bucket)", lower_bound=0)
flags.DEFINE_boolean("flops", False,
                     "also compile unrolled 1- and 2-layer steps for XLA's full-step FLOPs")
flags.DEFINE_boolean("json", False, "print only the JSON line")
flags.DEFINE_boolean("all", False, "driver: run every combination")
flags.DEFINE_boolean("fit", False,
                     "driver: per target and variant, the largest micro-batch that fits")
flags.DEFINE_list("devices_list", ["8", "64", "256"], "driver: fake device counts")
flags.DEFINE_list("targets", [], "driver: TPU targets instead of --devices_list")
flags.DEFINE_list("variants", ["stage1_256", "stage2_512", "stage3_1024"],
                  "driver: config variants (unless --config names one)")
flags.DEFINE_list("remats", [], "--fit: policies to try, in order (default: every one, least "
                  "recomputation first)")
flags.DEFINE_integer("timeout", 3600, "driver: seconds per combination", lower_bound=1)
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.ERROR)  # the empty-prompt stand-in warning is expected
  from svg_jax import config as config_lib  # JAX after cli.run's process set-up
  from svg_jax.train import aot, aot_sweep

  config_lib.model_section(FLAGS.config)  # the DiT's step only: a decoder config is one line
  config_spec = config_flags.get_config_filename(FLAGS["config"])
  settings = {field: FLAGS[flag].value for flag, field in FIELD_FLAGS.items()}
  if FLAGS.all or FLAGS.fit:
    children = aot_sweep.Children(os.path.abspath(__file__), config_spec,
                                  aot_sweep.forwarded_flags(FLAGS), FLAGS.timeout)
    if FLAGS.fit:
      overrides = config_flags.get_override_values(FLAGS["config"])
      return aot_sweep.fit(
          children, variants=FLAGS.variants, targets=FLAGS.targets, remats=FLAGS.remats,
          mesh=FLAGS.mesh, config_of=lambda spec: aot.with_settings(
              cli.read_config_file(spec, overrides=overrides), settings))
    return aot_sweep.every(children, variants=FLAGS.variants, targets=FLAGS.targets,
                           devices=FLAGS.devices_list)

  aot.compile_here(0 if FLAGS.target else FLAGS.devices)
  config = FLAGS.config
  n_layers_config = config_lib.nextdit_config(config).n_layers
  r = aot.compile_report(aot.with_settings(config, settings), target=FLAGS.target,
                         fake_devices=FLAGS.devices, mesh=FLAGS.mesh,
                         per_device_batch=FLAGS.per_device_batch, cap_len=FLAGS.cap_len,
                         flops=FLAGS.flops)
  path, _, variant = config_spec.partition(":")
  r.update(variant=variant, config=os.path.basename(path), n_layers_config=n_layers_config)
  if not FLAGS.json:
    print("\n".join(aot.report_lines(r)))
  print(json.dumps(r))
  return 0


if __name__ == "__main__":
  cli.run(main)
