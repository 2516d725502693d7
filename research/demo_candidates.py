"""The demo's design candidates side by side: each runs `launch/demo.py`'s whole pipeline (fresh
workdir, every stage, the same evaluation) with one preset of `svg_jax/demo/configs.py` changed
as CANDIDATES says, and the table collects wall time, DiT samples seen, held-out and seen
ShapesGenEval. docs/demo.md has the measured table and the choice it made.

  python research/demo_candidates.py --root runs/candidates [--only small,small_d192]

A candidate whose workdir already holds `eval/scores.json` is not rerun (its row is read back).
"""
import dataclasses
import json
import os
import time

from absl import flags

from svg_jax import cli

flags.DEFINE_string("root", "runs/candidates", "one workdir per candidate under this folder")
flags.DEFINE_list("only", [], "candidates to run (default: all)")
FLAGS = flags.FLAGS

# name -> (base preset, field overrides), the rows of docs/demo.md's candidates table. Each
# changes one lever against its neighbour; the step counts keep every pipeline near the demo's
# budget on 2 CPU cores (the width-192 DiT runs 3000 steps in the time of ~5000 at width 128).
CANDIDATES = {
    "full": ("full", {}),  # the demo's size before the small preset
    # a 128-channel latent and a width-128 DiT, the layouts of `full`
    "small_jittered": ("small", {"layouts": "jittered", "dit_lr": 1e-3, "dit_steps": 4000}),
    # + every object exactly on its slot
    "small_fixed": ("small", {"dit_lr": 1e-3, "dit_steps": 4000}),
    # + a 64-channel latent (the DiT twice its input width)
    "small_enc64": ("small", {"encoder_dim": 64, "encoder_heads": 1, "dit_lr": 1e-3,
                              "dit_steps": 4000}),
    # + a width-192 DiT
    "small_d192": ("small", {"dit_dim": 192, "dit_heads": 6, "dit_lr": 1e-3, "dit_steps": 3000}),
    # small_fixed with twice the learning rate, at 4000 and 4500 steps
    "small_lr2e-3": ("small", {"dit_lr": 2e-3, "dit_steps": 4000}),
    "small_lr2e-3_4500": ("small", {"dit_lr": 2e-3}),
    "small": ("small", {}),  # the default: small_fixed with 4500 steps
}


def main(argv):
  del argv
  from svg_jax.demo import configs, pipeline

  rows = []
  for name, (base, changes) in CANDIDATES.items():
    if FLAGS.only and name not in FLAGS.only:
      continue
    preset_name = f"candidate_{name}"
    configs.PRESETS[preset_name] = dataclasses.replace(configs.preset(base), **changes)
    workdir = os.path.join(FLAGS.root, name)
    scores_path = os.path.join(workdir, "eval", "scores.json")
    if not os.path.exists(scores_path):
      start = time.time()
      pipeline.run(pipeline.DemoSettings(workdir=workdir, preset=preset_name))
      with open(os.path.join(workdir, "wall_s.txt"), "w") as f:
        f.write(f"{time.time() - start:.0f}\n")
    with open(scores_path) as f:
      report = json.load(f)
    with open(os.path.join(workdir, "wall_s.txt")) as f:
      wall = float(f.read())
    rows.append((name, wall, report))
  print(f"{'candidate':>22} {'wall s':>7} {'samples':>8} {'held overall':>13} {'held single':>12} "
        f"{'seen overall':>13} {'seen single':>12} {'ceiling':>8}")
  for name, wall, r in rows:
    seen = r.get("seen_scores", {})
    print(f"{name:>22} {wall:>7.0f} {r['dit_images_seen']:>8} {r['scores']['overall']:>13.3f} "
          f"{r['scores']['single_object']:>12.2f} {seen.get('overall', float('nan')):>13.3f} "
          f"{seen.get('single_object', float('nan')):>12.2f} "
          f"{r['decoder_reconstruction_ceiling']['overall']:>8.3f}")


if __name__ == "__main__":
  cli.run(main)
