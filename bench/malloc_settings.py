"""The demo DiT's CPU train step with glibc's malloc defaults against svg_jax/malloc_tuning.py's
settings, at growing batch sizes: steps/s (interleaved, each setting in a process of its own),
page faults per step, resident memory and compile time. Shows where the settings pay (temporaries
under the 2 GiB trim threshold) and where they cost.

  python bench/malloc_settings.py [--batches 16,32,64] [--dtype float32]

Each setting's process is told its malloc choice in its environment (`malloc_tuning.OPT_OUT`, read
by `cli.run`'s set-up before JAX starts) and compiles without the persistent compilation cache, so
that both compile times are measured compiles.
"""
from __future__ import annotations

import os
import sys
import time

from absl import app, flags

from svg_jax import cli, compile_cache, malloc_tuning

flags.DEFINE_list("batches", ["16", "32", "64"], "global batch sizes")
flags.register_validator("batches", lambda batches: all(b.isdigit() and int(b) > 0
                                                        for b in batches),
                         message="--batches: expected positive integers, e.g. 16,32,64")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype (the demo's: fp32)")
flags.DEFINE_integer("rounds", 3, "interleaved rounds", lower_bound=1)
flags.DEFINE_integer("per_round", 3, "steps per round", lower_bound=1)
flags.DEFINE_string("serve", "", "internal: run one setting's step for the harness")
FLAGS = flags.FLAGS

DEFAULTS, TUNED = "glibc defaults", "malloc_tuning"
# Each setting's process: its malloc choice, and no compilation cache (an empty folder: off).
ENVS = {DEFAULTS: {malloc_tuning.OPT_OUT: "1", compile_cache.ENV: ""},
        TUNED: {malloc_tuning.OPT_OUT: "0", compile_cache.ENV: ""}}


def serve(batch: int) -> None:
  """One setting's process (which one: its environment, ENVS, which cli.run's set-up read)."""
  import resource

  from dit_step import mse_step
  from harness import serve as serve_steps

  applied = malloc_tuning.tune()  # what cli.run did, before JAX started
  import jax
  import jax.numpy as jnp
  import optax

  from svg_jax.demo import configs
  from svg_jax.models.nextdit import NextDiT, NextDiTConfig

  model_cfg = configs.dit("full").model.to_dict()  # the DiT its measurement used
  cfg = NextDiTConfig.from_dict({**model_cfg, "compute_dtype": FLAGS.dtype})
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(keys[0], (batch, 8, 8, cfg.in_channels))
  t = jax.random.uniform(keys[1], (batch,))
  cap = jax.random.normal(keys[2], (batch, 32, cfg.cap_feat_dim))
  mask = jnp.ones((batch, 32), bool)
  model = NextDiT(cfg)
  params = jax.jit(model.init)(keys[3], x, t, cap, mask)["params"]
  tx = optax.adamw(1e-4)
  state = [params, tx.init(params)]

  start = time.perf_counter()
  # The DiT denoises toward its own input: any fixed target times the same step.
  compiled = jax.jit(mse_step(model, tx), donate_argnums=(0, 1)).lower(
      *state, x, t, cap, mask, x).compile()
  compile_s = time.perf_counter() - start
  temp_gib = compiled.memory_analysis().temp_size_in_bytes / 2**30

  def run():
    state[0], state[1], loss = compiled(*state, x, t, cap, mask, x)
    loss.block_until_ready()

  for _ in range(3):  # the heap settles in the first steps
    run()
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(3):
    run()
  faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 3
  rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  serve_steps(run, dict(applied=applied, compile_s=compile_s, temp_gib=temp_gib,
                        faults=faults, rss_gib=rss_gib))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.serve:
    return serve(int(FLAGS.serve.rsplit(":", 1)[1]))  # --serve=<setting>:<batch>
  from harness import interleave_processes, summarize

  for batch in (int(b) for b in FLAGS.batches):
    commands = {name: [sys.executable, os.path.abspath(__file__), f"--serve={name}:{batch}",
                       f"--dtype={FLAGS.dtype}"] for name in (DEFAULTS, TUNED)}
    times, infos = interleave_processes(commands, rounds=FLAGS.rounds, per_round=FLAGS.per_round,
                                        envs=ENVS)
    if not infos[TUNED]["applied"]:
      raise SystemExit("malloc_tuning did not apply here (not glibc, or an accelerator backend)")
    print(f"\n== demo DiT train step ({FLAGS.dtype}), batch {batch}: "
          f"{infos[DEFAULTS]['temp_gib']:.2f} GiB of XLA temporaries")
    print(summarize(times, DEFAULTS, batch, "img"))
    for name, info in infos.items():
      print(f"{name:<28}{info['faults']:>10.0f} page faults/step, peak RSS {info['rss_gib']:.2f} "
            f"GiB, compile {info['compile_s']:.1f}s", flush=True)


if __name__ == "__main__":
  cli.run(main)
