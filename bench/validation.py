"""What in-training validation costs a run (svg_jax/train/validation.py), on configs/tiny.py:full.

Measured side by side in one process, in alternating rounds (bench/harness.py): one train step of
`dit_task.DiTSetup` (the demo DiT, batch 16 of 8x8x384 latents), one grid (the demo's 8 validation
prompts, 25 DPM-Solver++ steps with CFG, decoded by the demo-sized decoder, the PNG and the
TensorBoard image written) and one held-out loss (64 records x 4 times). The weights are random
(cost does not depend on them); the prompts' features are a random .npz of the file layout.
Printed: seconds of each, and steps/s of a run without validation against one that validates
every N steps (`--every`, the demo's 100 by default).

  python bench/validation.py [--every 100] [--rounds 4]
"""
import os
import shutil
import statistics
import tempfile

from absl import app, flags

from svg_jax import cli

flags.DEFINE_integer("every", 100, "validate every N train steps", lower_bound=1)
flags.DEFINE_integer("rounds", 4, "alternating rounds", lower_bound=1)
flags.DEFINE_integer("steps", 10, "train steps per round", lower_bound=1)
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  work = tempfile.mkdtemp(prefix="bench_validation_")  # the run's files: ~30 MB
  try:
    measure(FLAGS, work)
  finally:
    shutil.rmtree(work, ignore_errors=True)


def measure(args, work: str) -> None:
  """Builds the run's files in `work`, measures and prints."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  import harness  # bench/, beside this script
  from svg_jax import autoencoder as ae_lib
  from svg_jax import latent_stats, parallel
  from svg_jax.convert import decoder as dec_conv
  from svg_jax.convert.safetensors_io import save_safetensors
  from svg_jax.data import synthetic
  from svg_jax.demo import configs as demo_configs
  from svg_jax.models.decoder import Decoder, DecoderConfig
  from svg_jax.train import dit_task

  config = demo_configs.dit("full")  # configs/tiny.py:full, the DiT its measurement used
  m = config.model
  config.autoencoder.decoder = demo_configs.decoder("full").autoencoder.decoder
  dec_cfg = DecoderConfig.from_dict(config.autoencoder.decoder.to_dict())
  dec = jax.jit(Decoder(dec_cfg).init)(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, m.in_channels)))
  config.autoencoder.decoder_path = os.path.join(work, "decoder.safetensors")
  save_safetensors(config.autoencoder.decoder_path,
                   dec_conv.params_to_official(dec["params"], dec_cfg))
  rng = np.random.default_rng(0)
  config.autoencoder.stats_path = os.path.join(work, "stats.pt")
  latent_stats.save_latent_stats(config.autoencoder.stats_path, rng.normal(0, 1, m.in_channels),
                                 rng.uniform(0.5, 2, m.in_channels))
  prints = ae_lib.config_fingerprints(config.autoencoder)
  hw = int(config.data.resolution) // int(config.autoencoder.encoder.patch_size)
  for name, n in (("train", 256), ("heldout", 64)):
    synthetic.write_random_dataset(os.path.join(work, name), buckets=[(hw, hw)], num_records=n,
                                   latent_channels=int(m.in_channels),
                                   text_dim=int(m.cap_feat_dim), caption_len=(7, 30),
                                   fingerprints=prints, seed=len(name))
  prompts = [f"prompt {i}" for i in range(8)]
  length = 32
  mask = np.arange(length)[None] < rng.integers(8, length, (8, 1))
  arrays = dict(prompts=np.asarray(prompts), mask=mask, uncond_mask=np.arange(length)[None] < 1,
                features=rng.normal(0, 1, (8, length, m.cap_feat_dim)).astype(np.float32),
                uncond_features=rng.normal(0, 1, (1, length, m.cap_feat_dim)).astype(np.float32))
  np.savez(os.path.join(work, "prompts.npz"), **arrays)
  config.data.path = os.path.join(work, "train")
  config.data.eval_path = os.path.join(work, "heldout")
  config.train.sample_every = config.train.eval_every = args.every
  config.validation.update(dict(prompts=tuple(prompts), steps=25, shift=1.0,
                                text_features=os.path.join(work, "prompts.npz")))
  problems = dit_task.config_problems(config, 1)
  assert not problems, problems

  mesh = parallel.make_mesh(dict(config.mesh))
  setup = dit_task.DiTSetup(config, mesh)
  logger = setup.logger_class(work, num_steps=10 ** 6, num_devices=jax.device_count(),
                              chip="cpu")
  it = setup.make_data_iterator()
  batch = setup.device_batch(next(it))
  key = jax.random.PRNGKey(0)
  with parallel.mesh_context(mesh, setup.rules):
    box = {"state": setup.init_state(0)}

    def steps():
      for _ in range(args.steps):
        box["state"], metrics = setup.step(box["state"], batch, key)
      jax.block_until_ready(metrics)

    def grid():
      setup.validation._due = (True, False)
      setup.evaluate(box["state"], args.every)

    def heldout():
      setup.validation._due = (False, True)
      setup.evaluate(box["state"], args.every)

    times = harness.interleave({"steps": steps, "grid": grid, "heldout": heldout},
                               rounds=args.rounds, per_round=1)
  logger.close()
  step_s = statistics.median(times["steps"]) / args.steps
  grid_s, loss_s = statistics.median(times["grid"]), statistics.median(times["heldout"])
  print(f"tiny ({jax.device_count()} CPU device(s)): train step {step_s * 1e3:.1f} ms, grid "
        f"{grid_s:.2f} s ({len(prompts)} prompts, 25 steps), held-out loss {loss_s:.2f} s "
        "(64 records x 4 t)")
  base = 1 / step_s
  for name, extra in (("grids", grid_s), ("held-out loss", loss_s), ("both", grid_s + loss_s)):
    with_val = args.every / (args.every * step_s + extra)
    print(f"  every {args.every} steps, {name:13s}: {with_val:.3f} steps/s against {base:.3f} "
          f"({100 * (base / with_val - 1):.1f}% more time)")


if __name__ == "__main__":
  cli.run(main)
