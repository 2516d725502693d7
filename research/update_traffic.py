"""How close the DiT step's parameter update comes to the least memory traffic it can have.

The update at the end of every step (the global gradient norm, clipping, AdamW, the new params,
the EMA: `dit_step`'s tail, `state.apply_gradients`) is pure bandwidth. At the least it reads the
gradients twice (the norm must be known before any update), the params, both Adam moments and
the EMA once, and writes the params, the moments and the EMA once: 10 fp32 passes over the
parameters. XLA's cost analysis of the compiled update says how many bytes it reads and writes;
the ratio of the two bounds what a hand-fused update could save.

  python research/update_traffic.py --config configs/svg_t2i_2b.py:stage1_256 --target v5p-8

prints one JSON line: parameters per device, XLA's bytes accessed, the minimum and their ratio.
`--target` compiles for a TPU slice (libtpu's topology, FSDP over its chips); without it, for
this machine's devices (FSDP over all of them). Bad input (a flag, the config file, the target)
is one line and exit status 2 (`cli.run`), found before anything compiles.
"""
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the configs

import jax  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from svg_jax import cli, compile_cache, malloc_tuning, parallel  # noqa: E402
from svg_jax.input_errors import InputError  # noqa: E402
from svg_jax.train import aot, dit_task  # noqa: E402
from svg_jax.train import state as state_lib  # noqa: E402

FLAGS = flags.FLAGS
cli.define_config_file("config", None, "ml_collections config file[:variant]")
flags.DEFINE_string("target", "", "a TPU slice to compile for: v5p-8, v5e-64, ...")
MIN_PASSES = 10  # fp32 passes over the parameters: 6 reads (grads twice) + 4 writes


def update_traffic(config, mesh) -> dict:
  """{"params_per_device", "bytes_accessed", "minimum_bytes", "ratio", "compile_s"} of the
  compiled update of `config`'s train state on `mesh` (state donated, as the step donates it)."""
  setup = dit_task.DiTSetup(config, mesh)
  decay = float(config.train.ema_decay)

  def update(state, grads):
    return state_lib.apply_gradients(state, grads, setup.tx, decay), optax.tree.norm(grads)

  shardings = setup.state_shardings
  jitted = jax.jit(update, in_shardings=(shardings, shardings.params),
                   out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
  abstract = setup.abstract_state
  start = time.perf_counter()
  with parallel.mesh_context(mesh, setup.rules):
    compiled = jitted.lower(abstract, abstract.params).compile()
  seconds = time.perf_counter() - start
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0]
  n = sum(math.prod(leaf.sharding.shard_shape(leaf.shape))
          for leaf in jax.tree.leaves(abstract.params))
  dtypes = {str(leaf.dtype) for leaf in jax.tree.leaves(abstract)}
  if dtypes != {"float32", "int32"}:  # the minimum counts fp32 params, moments and EMA
    raise ValueError(f"the state holds {sorted(dtypes)}, expected fp32 arrays and the step")
  minimum = MIN_PASSES * 4 * n
  accessed = float(analysis["bytes accessed"])
  return {"params_per_device": n, "bytes_accessed": accessed, "minimum_bytes": minimum,
          "ratio": accessed / minimum, "compile_s": round(seconds, 1)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  if FLAGS.target:
    try:
      target = aot.tpu_target(FLAGS.target)
    except ValueError as e:  # its only error: a name that is no TPU slice
      raise InputError(f"--target: {e}") from e
    config.mesh.update(dict(data=1, fsdp=target.chips, tensor=1))
    mesh = aot.tpu_mesh(target, dict(config.mesh))
  else:
    config.mesh.update(dict(data=1, fsdp=jax.device_count(), tensor=1))
    mesh = parallel.make_mesh(config.mesh)
  out = update_traffic(config, mesh)
  out.update(config=config_flags.get_config_filename(FLAGS["config"]),
             target=FLAGS.target or f"{jax.device_count()} {jax.default_backend()}")
  print(json.dumps(out))


if __name__ == "__main__":
  # It compiles, never runs, and times its compile: without the malloc settings (they slow XLA's
  # compiles, svg_jax/malloc_tuning.py) or the persistent compilation cache (a cached compile takes
  # no time), unless the environment asks for them.
  os.environ.setdefault(malloc_tuning.OPT_OUT, "1")
  os.environ.setdefault(compile_cache.ENV, "")
  flags.mark_flags_as_required(["config"])
  cli.run(main)
