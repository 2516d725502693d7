"""DiT train step (forward, backward, AdamW): ours (jitted JAX) against diffusers'
Lumina2Transformer2DModel + torch.optim.AdamW on the same config, batch, token count and dtype,
measured interleaved in one run.

  python bench/train_step.py --sizes tiny,calib,2b_slice --dtypes float32,bfloat16
  python bench/train_step.py --sizes 2b_256,2b_1024 --dtypes bfloat16      # on a GPU

bfloat16 means bf16 matmul inputs with fp32 params on our side (activations between ops fp32, or
bf16 with --activation_dtype compute) and torch.autocast(bfloat16) on torch's.
Prints images/s for both and our speed relative to torch (> 1 means we are faster), and our model
TFLOP/s (the analytic count behind the trainer's MFU metric) with MFU where the chip's peak is
known.
On a GPU both sides run there: ours with cuDNN attention by default, torch eager with its SDPA.
Each contender runs in a process of its own (bench/harness.py): ours with the launch scripts'
malloc settings (svg_jax/malloc_tuning.py, applied by `cli.run`), torch with glibc's defaults,
which suit it better. An unknown --sizes or --dtypes entry is refused (one line, exit 2) before
any contender starts; the sizes are bench/sizes.py's.
"""
from __future__ import annotations

import dataclasses
import os
import sys

from absl import app, flags

from svg_jax import cli, malloc_tuning

flags.DEFINE_list("sizes", ["tiny", "calib", "2b_slice"], "model sizes to run (bench/sizes.py)")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "compute dtypes to run")
flags.DEFINE_integer("rounds", 5, "interleaved rounds", lower_bound=1)
flags.DEFINE_integer("per_round", 2, "steps per contender per round", lower_bound=1)
flags.DEFINE_enum("attention", "auto", ["auto", "xla", "cudnn"],
                  "our attention backend; auto: cudnn on a GPU, xla elsewhere")
flags.DEFINE_enum("activation_dtype", "float32", ["float32", "compute"],
                  "our activations between ops: float32, or the compute dtype (the 2B stage "
                  "configs' setting, as torch's autocast hands them on)")
flags.DEFINE_string("serve", None, "internal: be this contender's process (bench/harness.py)")
OURS, TORCH = "svg-jax", "torch (diffusers)"
DTYPES = ("float32", "bfloat16")
FLAGS = flags.FLAGS

from dit_step import mse_step  # noqa: E402
from harness import check_names  # noqa: E402
from sizes import SIZES  # noqa: E402


def build(size: str, dtype: str):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import torch
  from diffusers import Lumina2Transformer2DModel

  from svg_jax.convert import nextdit as keymap
  from svg_jax.models.nextdit import NextDiT, NextDiTConfig
  from svg_jax.train import flop_count

  overrides, batch, h, w, cap_len = SIZES[size]
  on_gpu = jax.default_backend() == "gpu"
  attention = FLAGS.attention if FLAGS.attention != "auto" else ("cudnn" if on_gpu else "xla")
  cfg = dataclasses.replace(NextDiTConfig(**overrides), compute_dtype=dtype, scan_layers=False,
                            remat_policy="none", attention_backend=attention,
                            activation_dtype=FLAGS.activation_dtype)
  device = "cuda" if on_gpu else "cpu"
  torch.manual_seed(0)
  ref = Lumina2Transformer2DModel(**{k: v for k, v in keymap.diffusers_config(cfg).items()
                                     if not k.startswith("_")})
  official = keymap.diffusers_to_official({k: v.numpy() for k, v in ref.state_dict().items()}, cfg)
  ref = ref.to(device)
  params = jax.device_put(keymap.official_to_params(official, cfg))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, h, w, cfg.in_channels)).astype(np.float32)
  target = rng.standard_normal(x.shape).astype(np.float32)
  t = rng.uniform(size=(batch,)).astype(np.float32)
  cap = rng.standard_normal((batch, cap_len, cfg.cap_feat_dim)).astype(np.float32)
  mask = np.ones((batch, cap_len), bool)

  # --- torch
  opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0)
  tx_, tt, tcap, tmask = (torch.from_numpy(a).to(device)
                          for a in (x.transpose(0, 3, 1, 2).copy(), t, cap, mask.astype(np.int64)))
  ttarget = torch.from_numpy(target.transpose(0, 3, 1, 2).copy()).to(device)
  ref.train()

  def torch_step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      out = ref(tx_, tt, tcap, tmask, return_dict=False)[0]
    loss = torch.mean((out.float() - ttarget) ** 2)
    loss.backward()
    opt.step()
    if on_gpu:
      torch.cuda.synchronize()

  # --- ours
  model = NextDiT(cfg)
  tx = optax.adamw(1e-4, b1=0.9, b2=0.95, eps=1e-15, weight_decay=0.0)
  state = {"params": params, "opt": tx.init(params)}
  inputs = tuple(jnp.asarray(a) for a in (x, t, cap, mask))
  jtarget = jnp.asarray(target)

  step = jax.jit(mse_step(model, tx), donate_argnums=(0, 1))

  def jax_step():
    state["params"], state["opt"], loss = step(state["params"], state["opt"], *inputs, jtarget)
    loss.block_until_ready()

  n_params = sum(p.numel() for p in ref.parameters())
  flops = flop_count.dit_train_flops(cfg, batch, (h, w), cap_len)
  contenders = {OURS: jax_step, TORCH: torch_step}
  return contenders, batch, n_params, (h // cfg.patch_size) * (w // cfg.patch_size) + cap_len, flops


def serve(name: str) -> None:
  """One contender's process: builds the size / dtype of the flags and serves its step (ours with
  the malloc settings that `cli.run` applied; torch's process opts out, see main)."""
  from harness import serve as serve_steps

  contenders, batch, n_params, tokens, flops = build(FLAGS.sizes[0], FLAGS.dtypes[0])
  serve_steps(contenders[name], dict(batch=batch, n_params=n_params, tokens=tokens, flops=flops))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  check_names("sizes", FLAGS.sizes, SIZES, "bench/sizes.py")
  check_names("dtypes", FLAGS.dtypes, DTYPES)
  if FLAGS.serve:
    return serve(FLAGS.serve)
  import statistics

  # This process only asks which device there is: on a GPU, the memory is the contenders'.
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"

  import jax
  from harness import interleave_processes, summarize

  from svg_jax.train import chip_specs

  device = jax.devices()[0]
  peak = chip_specs.peak_tflops("auto")
  print(f"device: {device.device_kind} ({device.platform}); bf16 peak used for MFU: {peak} TFLOP/s")
  for size in FLAGS.sizes:
    for dtype in FLAGS.dtypes:
      commands = {name: [sys.executable, os.path.abspath(__file__), f"--serve={name}",
                         f"--sizes={size}", f"--dtypes={dtype}", f"--attention={FLAGS.attention}",
                         f"--activation_dtype={FLAGS.activation_dtype}"]
                  for name in (OURS, TORCH)}
      times, infos = interleave_processes(commands, rounds=FLAGS.rounds,
                                          per_round=FLAGS.per_round,
                                          envs={TORCH: {malloc_tuning.OPT_OUT: "1"}})
      info = infos[OURS]
      print(f"\n== train step, {size} ({info['n_params'] / 1e6:.1f}M params, batch "
            f"{info['batch']}, {info['tokens']} tokens), {dtype}, our activations "
            f"{FLAGS.activation_dtype}")
      print(summarize(times, TORCH, info["batch"], "img"))
      tflops = info["flops"] / statistics.median(times[OURS]) / 1e12
      mfu = f", MFU {tflops / peak:.1%}" if peak else ""
      print(f"svg-jax: {info['flops'] / 1e12:.3f} TFLOP per step (analytic), {tflops:.1f} "
            f"TFLOP/s{mfu}", flush=True)


if __name__ == "__main__":
  cli.run(main)
