"""The official trainer's DiT step in PyTorch, on the shapes of any of our configs: the baseline of
bench/trainer.py ("ours >= 1.5x torch.compile's images/s", docs/performance.md).

  python bench/torch_trainer.py --config configs/tiny.py --steps 5 --ours run
  python bench/torch_trainer.py --config configs/svg_t2i_2b.py:stage1_256 --global_batch_size 32 \\
      --steps 10 --compile blocks --ours gpu_out/stage1_auto.json                            # on a GPU

The step is the official one (docs/reference.md §5) on one device: diffusers'
`Lumina2Transformer2DModel` of the config's model with fp32 master weights, activation
checkpointing on each main layer (non-reentrant, as `--checkpointing`), a bf16 autocast forward
when the config computes in bf16, the flow-matching loss (logit-normal t with the resolution
shift, x_t = t x1 + (1 - t) x0, velocity target), `clip_grad_norm_(train.grad_clip)`,
`torch.optim.AdamW` (train.b1, b2, eps, weight_decay, lr) and an EMA update of every parameter.
`--compile model` wraps the model in `torch.compile` (the default mode), `--compile blocks`
compiles each transformer block instead. The batch is a fixed random one already on the device:
torch is timed without a data loader, ours with its Grain pipeline.

It runs 2 x --steps steps: the first --steps hold compilation and warm-up, the second are timed.
The last stdout line is one JSON object with bench/trainer.py's keys (steps/s, img/s, tokens/s,
the same analytic TFLOP/s and MFU, peak memory, the warm-up's seconds as compile_s). With --ours
(a JSON file that bench/trainer.py printed, or `run` to run bench/trainer.py first with the same
--config, --steps, --global_batch_size and --peak_tflops) it adds ours and `speedup`: our
images/s over torch's.
"""
import json
import math
import os
import subprocess
import sys
import time

# JAX only lends this process its config and FLOP count: keep it off the GPU that torch measures
# (but not bench/trainer.py's process that `--ours run` starts).
_ENV = dict(os.environ)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from svg_jax import cli, malloc_tuning  # noqa: E402
from svg_jax.input_errors import InputError, MissingInput  # noqa: E402

cli.define_config_file("config", None, "ml_collections config file[:variant]")
flags.DEFINE_integer("steps", 5, "timed steps (as many again run first: compile + warm-up)")
flags.DEFINE_integer("global_batch_size", 0, "0: the config's train.global_batch_size")
flags.DEFINE_float("peak_tflops", 0.0, "peak TFLOP/s of the device for MFU (0: the chip's)")
flags.DEFINE_enum("compile", "none", ["none", "model", "blocks"],
                  "torch.compile the whole model, or each transformer block (regional compilation: "
                  "the blocks share one compiled graph, so it compiles in a fraction of the time)")
flags.DEFINE_bool("checkpointing", True, "activation checkpointing on the main layers (official)")
flags.DEFINE_string("ours", "", "bench/trainer.py's JSON output to compare with, or `run`")
FLAGS = flags.FLAGS
_OURS_KEYS = ("images_per_sec", "remat_policy")  # what this script reads of bench/trainer.py's JSON


def _read_ours(path: str) -> dict:
  """bench/trainer.py's JSON line, the last line of `path`; bad input (`InputError`) if it is not
  there."""
  try:
    with open(path) as f:
      lines = f.read().strip().splitlines()
  except FileNotFoundError as e:
    raise MissingInput(f"--ours {path}: no such file (bench/trainer.py's JSON output, or `run`)"
                       ) from e
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(f"--ours {path}: cannot be read: {e}") from e
  try:
    out = json.loads(lines[-1]) if lines else None
  except json.JSONDecodeError:
    out = None
  if not isinstance(out, dict) or any(key not in out for key in _OURS_KEYS):
    raise InputError(f"--ours {path}: its last line is not bench/trainer.py's JSON object (with "
                     f"{', '.join(_OURS_KEYS)})")
  return out


def _ours(arg: str) -> dict:
  """bench/trainer.py's result: read from a file, or measured now with this run's shared flags."""
  if arg != "run":
    return _read_ours(arg)
  forwarded = [f"--config={config_flags.get_config_filename(FLAGS['config'])}",
               f"--steps={FLAGS.steps}", f"--global_batch_size={FLAGS.global_batch_size}",
               f"--peak_tflops={FLAGS.peak_tflops}"]
  argv = sys.argv[1:]
  for i, a in enumerate(argv):  # the config overrides, --config.a.b=v or --config.a.b v
    if a.startswith("--config."):
      forwarded += [a] if "=" in a or i + 1 == len(argv) else [a, argv[i + 1]]
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainer.py")
  out = subprocess.run([sys.executable, script, *forwarded], check=True, stdout=subprocess.PIPE,
                       text=True, env=_ENV).stdout
  return json.loads(out.strip().splitlines()[-1])


def run(config) -> dict:
  import torch
  from diffusers import Lumina2Transformer2DModel

  from svg_jax import config as config_lib
  from svg_jax.convert import nextdit as keymap
  from svg_jax.train import aot, chip_specs, dit_step, flop_count

  cfg = config_lib.nextdit_config(config)
  tc, fc = config.train, config.flow
  batch = FLAGS.global_batch_size or int(tc.global_batch_size)
  hw = aot.latent_hw(config)
  cap_len = int(config.data.max_caption_len)
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  bf16 = cfg.compute_dtype == "bfloat16"

  torch.manual_seed(int(config.seed))
  with torch.device(device):  # initialized where it trains: 2.6B parameters init slowly on a CPU
    model = Lumina2Transformer2DModel(**{k: v for k, v in keymap.diffusers_config(cfg).items()
                                         if not k.startswith("_")})
  model.train()
  if FLAGS.checkpointing:
    model.enable_gradient_checkpointing()
  ema = [p.detach().clone() for p in model.parameters()]
  opt = torch.optim.AdamW(model.parameters(), lr=float(tc.lr), betas=(float(tc.b1), float(tc.b2)),
                          eps=float(tc.eps), weight_decay=float(tc.weight_decay))
  forward = model
  if FLAGS.compile == "model":
    forward = torch.compile(model)
  elif FLAGS.compile == "blocks":
    for block in (*model.noise_refiner, *model.context_refiner, *model.layers):
      block.compile()

  shift = dit_step.time_shift_factor(config)
  g = torch.Generator(device).manual_seed(0)
  x1 = torch.randn(batch, cfg.in_channels, *hw, generator=g, device=device)
  cap = torch.randn(batch, cap_len, cfg.cap_feat_dim, generator=g, device=device)
  mask = torch.ones(batch, cap_len, dtype=torch.int64, device=device)
  decay = float(tc.ema_decay)

  def step():
    t = torch.sigmoid(float(fc.logit_mean) + float(fc.logit_std)
                      * torch.randn(batch, generator=g, device=device))
    if shift is not None:
      t = t / (t + shift * (1.0 - t))
    x0 = torch.randn(x1.shape, generator=g, device=device)
    tb = t.view(-1, 1, 1, 1)
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
      v = forward(tb * x1 + (1.0 - tb) * x0, t, cap, mask, return_dict=False)[0]
    loss = torch.mean((v.float() - (x1 - x0)) ** 2)
    loss.backward()
    if float(tc.grad_clip) > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), float(tc.grad_clip))
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1.0 - decay)
    return loss

  def steps(n: int) -> tuple[float, float]:
    start = time.perf_counter()
    for _ in range(n):
      loss = step()
    value = loss.item()  # waits for the device
    return time.perf_counter() - start, value

  n = FLAGS.steps
  warmup_s, _ = steps(n)
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  seconds, loss = steps(n)
  if not math.isfinite(loss):
    raise RuntimeError(f"the torch step's loss is {loss}")
  flops = flop_count.dit_train_flops(cfg, batch, hw, cap_len)
  name = torch.cuda.get_device_name() if cuda else "cpu"
  chip = chip_specs.chip_of("gpu" if cuda else "cpu", name)
  peak = FLAGS.peak_tflops or chip_specs.PEAK_TFLOPS[chip]
  tokens = (hw[0] // cfg.patch_size) * (hw[1] // cfg.patch_size) + cap_len
  return {
      "contender": "torch " + ("eager" if FLAGS.compile == "none" else f"compile ({FLAGS.compile})"),
      "config": config_flags.get_config_filename(FLAGS["config"]), "device_kind": name,
      "torch": torch.__version__, "global_batch_size": batch, "latent_hw": list(hw),
      "cap_len": cap_len, "compute_dtype": cfg.compute_dtype, "checkpointing": FLAGS.checkpointing,
      "warmup_steps": n, "steps": n, "steps_per_sec": n / seconds,
      "images_per_sec": n * batch / seconds, "tokens_per_sec": n * batch * tokens / seconds,
      "tflops": flops * n / seconds / 1e12, "peak_tflops": peak,
      "mfu": flops * n / seconds / 1e12 / peak if peak else None,
      "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
      "compile_s": warmup_s, "loss": loss,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  ours = _ours(FLAGS.ours) if FLAGS.ours else None
  out = run(FLAGS.config)
  if ours is not None:
    out["ours"] = ours
    out["speedup"] = ours["images_per_sec"] / out["images_per_sec"]
    print(f"ours {ours['images_per_sec']:.1f} img/s ({ours['remat_policy']}), {out['contender']} "
          f"{out['images_per_sec']:.1f} img/s: {out['speedup']:.2f}x", file=sys.stderr)
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  # torch's step with glibc's malloc defaults, which suit it (svg_jax/malloc_tuning.py: its CPU
  # step is ~30% slower under the settings cli.run would apply); `--ours run`'s process keeps them.
  os.environ.setdefault(malloc_tuning.OPT_OUT, "1")
  flags.mark_flags_as_required(["config"])
  cli.run(main)
