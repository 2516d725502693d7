"""50-step DPM-Solver++ 2M renorm-CFG generation: ours (one jitted trajectory) against a PyTorch loop
over diffusers' Lumina2Transformer2DModel with diffusers' DPMSolverMultistepScheduler set up as
docs/equivalence/sampler.md §2.3 says (the official sampler), same weights, batch, latent size, in fp32.

  python bench/sampling.py --sizes tiny,calib

Each contender runs in a process of its own (bench/harness.py, as in bench/train_step.py): ours
with the launch scripts' malloc settings (applied by `cli.run`), torch with glibc's defaults. An
unknown --sizes entry is refused (one line, exit 2) before any contender starts.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

from svg_jax import cli, malloc_tuning

flags.DEFINE_list("sizes", ["tiny", "calib"], "model sizes (bench/sizes.py)")
flags.DEFINE_integer("steps", 50, "sampling steps", lower_bound=1)
flags.DEFINE_integer("rounds", 3, "interleaved rounds", lower_bound=1)
flags.DEFINE_string("serve", None, "internal: be this contender's process (bench/harness.py)")
FLAGS = flags.FLAGS
OURS, TORCH = "svg-jax", "torch (diffusers)"

from sizes import SIZES  # noqa: E402  (bench/, beside this script)
from harness import check_names  # noqa: E402


def build(size: str, steps: int, compare: bool):
  """The two contenders; with `compare`, also max |ours - torch| on the final latent (else None)."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from diffusers import DPMSolverMultistepScheduler, Lumina2Transformer2DModel

  from svg_jax import sampling
  from svg_jax.convert import nextdit as keymap
  from svg_jax.models.nextdit import NextDiT, NextDiTConfig

  overrides, batch, h, w, cap_len = SIZES[size]
  cfg = dataclasses.replace(NextDiTConfig(**overrides), scan_layers=False)
  torch.manual_seed(0)
  ref = Lumina2Transformer2DModel(**{k: v for k, v in keymap.diffusers_config(cfg).items()
                                     if not k.startswith("_")}).eval()
  official = keymap.diffusers_to_official({k: v.numpy() for k, v in ref.state_dict().items()}, cfg)
  params = jax.device_put(keymap.official_to_params(official, cfg))
  rng = np.random.default_rng(0)
  noise = rng.standard_normal((batch, h, w, cfg.in_channels)).astype(np.float32)
  cap = rng.standard_normal((batch, cap_len, cfg.cap_feat_dim)).astype(np.float32)
  mask = np.ones((batch, cap_len), bool)
  empty, empty_mask = np.zeros_like(cap), np.zeros_like(mask)
  empty[:, 0], empty_mask[:, 0] = cap[:, 0], True
  both_cap, both_mask = np.concatenate([cap, empty]), np.concatenate([mask, empty_mask])

  # --- torch: the official-equivalent scheduler, renorm-CFG on one [cond; uncond] batch per step
  sched = DPMSolverMultistepScheduler(
      num_train_timesteps=1000, use_flow_sigmas=True, flow_shift=10.0,
      prediction_type="flow_prediction", algorithm_type="dpmsolver++", solver_order=2,
      solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero")
  tcap, tmask = torch.from_numpy(both_cap), torch.from_numpy(both_mask.astype(np.int64))
  tnoise = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())

  def torch_generate():
    sched.set_timesteps(steps)
    sched.set_begin_index(0)
    x = tnoise.clone()
    with torch.inference_mode():
      for i, ts in enumerate(sched.timesteps):
        t = torch.full((2 * batch,), 1.0 - float(sched.sigmas[i]))
        v = ref(torch.cat([x, x]), t, tcap, tmask, return_dict=False)[0]
        vc, vu = v[:batch], v[batch:]
        g = vu + 4.0 * (vc - vu)
        nc = vc.flatten(1).norm(dim=1)
        ng = g.flatten(1).norm(dim=1)
        g = g * torch.clamp(nc / (ng + 1e-12), max=1.0)[:, None, None, None]
        x = sched.step(-g, ts, x).prev_sample
    return x

  # --- ours
  model = NextDiT(cfg)
  jcap, jmask = jnp.asarray(both_cap), jnp.asarray(both_mask)

  @jax.jit
  def generate(params, noise):
    def model_fn(x2, t2):
      return model.apply({"params": params}, x2, t2, jcap, jmask)
    return sampling.sample(sampling.guided_velocity(model_fn, "renorm", 4.0), noise,
                           solver="dpm", steps=steps, shift=10.0)

  jnoise = jnp.asarray(noise)
  err = None
  if compare:
    ours = np.asarray(generate(params, jnoise))
    theirs = torch_generate().numpy().transpose(0, 2, 3, 1)
    err = float(np.abs(ours - theirs).max())
  contenders = {OURS: lambda: generate(params, jnoise).block_until_ready(),
                TORCH: torch_generate}
  return contenders, batch, err


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  check_names("sizes", FLAGS.sizes, SIZES, "bench/sizes.py")
  if FLAGS.serve:  # one contender's process, ours with cli.run's malloc settings
    from harness import serve
    contenders, batch, err = build(FLAGS.sizes[0], FLAGS.steps, compare=FLAGS.serve == OURS)
    return serve(contenders[FLAGS.serve], dict(batch=batch, err=err))
  from harness import interleave_processes, summarize

  for size in FLAGS.sizes:
    commands = {name: [sys.executable, os.path.abspath(__file__), f"--serve={name}",
                       f"--sizes={size}", f"--steps={FLAGS.steps}"] for name in (OURS, TORCH)}
    times, infos = interleave_processes(commands, rounds=FLAGS.rounds, per_round=1,
                                        envs={TORCH: {malloc_tuning.OPT_OUT: "1"}})
    batch, err = infos[OURS]["batch"], infos[OURS]["err"]
    print(f"\n== {FLAGS.steps}-step DPM-Solver++ renorm-CFG, {size}, batch {batch} (x2 for CFG), "
          f"fp32; max |ours - torch| on the final latent: {err:.2e}")
    print(summarize(times, TORCH, batch, "img"), flush=True)


if __name__ == "__main__":
  cli.run(main)
