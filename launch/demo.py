"""The embedded default, end to end as far as the project reaches today (README Quickstart).

What it runs now, all offline on CPU:
  1. renders the coloured-shapes demo dataset (train + held-out prompts, GenEval metadata);
  2. prints the tiny DiT's parameter overview (configs/tiny.py);
  3. scores the held-out ground-truth renders with ShapesGenEval (the scorer the demo DiT will face);
  4. runs the tiny DiT (random init) inside a jitted 20-step DPM-Solver++ renorm-CFG sampling loop.
Decoder training, precompute, DiT training and evaluation of generated images join this script as their
issues land (issues 3-6); until then step 4 samples from an untrained model and says so.
"""
import time

from absl import app, flags

flags.DEFINE_string("workdir", "runs/demo", "where the demo writes its data and outputs")
flags.DEFINE_integer("num_train", 240, "demo training images")
flags.DEFINE_integer("num_heldout", 120, "held-out demo images (unseen combinations)")
flags.DEFINE_integer("image_size", 64, "demo image size in pixels")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import dataclasses
  import os

  import flax
  import jax
  import jax.numpy as jnp
  import numpy as np
  from clu import parameter_overview
  from PIL import Image

  from svg_jax import config as config_lib
  from svg_jax import sampling
  from svg_jax.data import shapes
  from svg_jax.eval import shapes_geneval
  from svg_jax.models import nextdit

  tiny = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "tiny.py")
  start = time.time()
  data_dir = os.path.join(FLAGS.workdir, "shapes")
  print(f"[1/4] demo dataset -> {data_dir}", flush=True)
  shapes.write_dataset(data_dir, FLAGS.num_train, FLAGS.num_heldout, FLAGS.image_size, seed=0)
  heldout = shapes.read_split(data_dir, "heldout")

  print("[2/4] tiny DiT (configs/tiny.py)", flush=True)
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny_config", tiny)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = config_lib.nextdit_config(module.get_config())
  abstract = flax.linen.meta.unbox(nextdit.abstract_params(cfg))
  print(parameter_overview.get_parameter_overview(abstract, include_stats=False))
  print(f"total parameters: {nextdit.count_params(abstract)}")

  print("[3/4] ShapesGenEval on held-out ground-truth renders", flush=True)
  images = [np.asarray(Image.open(os.path.join(data_dir, item["path"])).convert("RGB"))
            for item in heldout]
  scores = shapes_geneval.score(images, [item["metadata"] for item in heldout])
  shapes_geneval.print_table(scores)

  print("[4/4] 20-step DPM-Solver++ renorm-CFG loop over the (untrained) tiny DiT", flush=True)
  grid = FLAGS.image_size // 16
  model = nextdit.NextDiT(dataclasses.replace(cfg))
  batch, cap_len = 4, 16
  rng = np.random.default_rng(0)
  cap = jnp.asarray(rng.standard_normal((batch, cap_len, cfg.cap_feat_dim)), jnp.float32)
  mask = jnp.asarray(np.arange(cap_len)[None] < rng.integers(2, cap_len, (batch, 1)))
  empty = jnp.zeros_like(cap).at[:, 0].set(cap[:, 0])
  empty_mask = jnp.zeros_like(mask).at[:, 0].set(True)
  x = jnp.zeros((1, grid, grid, cfg.in_channels))
  params = model.init(jax.random.PRNGKey(0), x, jnp.zeros((1,)), cap[:1], mask[:1])["params"]

  @jax.jit
  def generate(params, noise):
    def model_fn(x2, t2):  # [cond; uncond] in one batch, as the official forward_with_cfg
      return model.apply({"params": params}, x2, t2, jnp.concatenate([cap, empty]),
                         jnp.concatenate([mask, empty_mask]))
    velocity = sampling.guided_velocity(model_fn, mode="renorm", scale=4.0)
    return sampling.sample(velocity, noise, solver="dpm", steps=20, shift=10.0)

  noise = sampling.initial_noise_batch(
      jnp.asarray([sampling.eval_seed(i, 0) for i in range(batch)]), (grid, grid, cfg.in_channels))
  latents = generate(params, noise)
  print(f"latents {latents.shape}, finite: {bool(jnp.all(jnp.isfinite(latents)))}, "
        f"std {float(jnp.std(latents)):.3f} (untrained model)")
  print(f"demo finished in {time.time() - start:.1f}s; outputs in {FLAGS.workdir}")


if __name__ == "__main__":
  app.run(main)
