"""DiT train step (forward, backward, AdamW): ours (jitted JAX) against diffusers' Lumina2Transformer2DModel
+ torch.optim.AdamW on the same config, batch, token count and dtype, measured interleaved in one run.

  python bench/train_step.py --sizes tiny,calib,2b_slice --dtypes float32,bfloat16

bfloat16 means bf16 matmul inputs with fp32 params on our side and torch.autocast(bfloat16) on torch's.
Prints images/s for both and our speed relative to torch (> 1 means we are faster).
"""
from __future__ import annotations

import dataclasses
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_list("sizes", ["tiny", "calib", "2b_slice"], "model sizes to run")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "compute dtypes to run")
flags.DEFINE_integer("rounds", 5, "interleaved rounds")
flags.DEFINE_integer("per_round", 2, "steps per contender per round")
FLAGS = flags.FLAGS

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

  overrides, batch, h, w, cap_len = SIZES[size]
  cfg = dataclasses.replace(NextDiTConfig(**overrides), compute_dtype=dtype, scan_layers=False,
                            remat_policy="none")
  torch.manual_seed(0)
  ref = Lumina2Transformer2DModel(**{k: v for k, v in keymap.diffusers_config(cfg).items()
                                     if not k.startswith("_")})
  official = keymap.diffusers_to_official({k: v.numpy() for k, v in ref.state_dict().items()}, cfg)
  params = jax.device_put(keymap.official_to_params(official, cfg))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, h, w, cfg.in_channels)).astype(np.float32)
  target = rng.standard_normal(x.shape).astype(np.float32)
  t = rng.uniform(size=(batch,)).astype(np.float32)
  cap = rng.standard_normal((batch, cap_len, cfg.cap_feat_dim)).astype(np.float32)
  mask = np.ones((batch, cap_len), bool)

  # --- torch
  opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0)
  tx_, tt, tcap, tmask = (torch.from_numpy(a) for a in (x.transpose(0, 3, 1, 2).copy(), t, cap,
                                                        mask.astype(np.int64)))
  ttarget = torch.from_numpy(target.transpose(0, 3, 1, 2).copy())
  ref.train()

  def torch_step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      out = ref(tx_, tt, tcap, tmask, return_dict=False)[0]
    loss = torch.mean((out.float() - ttarget) ** 2)
    loss.backward()
    opt.step()

  # --- ours
  model = NextDiT(cfg)
  tx = optax.adamw(1e-4, b1=0.9, b2=0.95, eps=1e-15, weight_decay=0.0)
  state = {"params": params, "opt": tx.init(params)}
  inputs = tuple(jnp.asarray(a) for a in (x, t, cap, mask))
  jtarget = jnp.asarray(target)

  @jax.jit
  def step(params, opt_state, inputs):
    def loss_fn(p):
      return jnp.mean(jnp.square(model.apply({"params": p}, *inputs) - jtarget))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(step.__wrapped__, donate_argnums=(0, 1))

  def jax_step():
    state["params"], state["opt"], loss = step(state["params"], state["opt"], inputs)
    loss.block_until_ready()

  n_params = sum(p.numel() for p in ref.parameters())
  return {"svg-jax": jax_step, "torch (diffusers)": torch_step}, batch, n_params, h * w + cap_len


def main(argv):
  del argv
  from harness import interleave, summarize

  for size in FLAGS.sizes:
    for dtype in FLAGS.dtypes:
      contenders, batch, n_params, tokens = build(size, dtype)
      times = interleave(contenders, rounds=FLAGS.rounds, per_round=FLAGS.per_round)
      print(f"\n== train step, {size} ({n_params / 1e6:.1f}M params, batch {batch}, {tokens} tokens), "
            f"{dtype}")
      print(summarize(times, "torch (diffusers)", batch, "img"), flush=True)


if __name__ == "__main__":
  app.run(main)
