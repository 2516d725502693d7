"""How far a trained DiT's denoiser is from the ideal one of its training set, per noise level.

  python research/probe_denoiser.py --records runs/demo/records --checkpoint runs/demo/dit

For `--num` training records, prints per t the mean-square error of the DiT's data estimate
x1_hat = x_t + (1 - t) v against the true latent and against the exact posterior mean over the
training latents with the same caption (`research/denoiser_probe.py`), and the errors of two
noise-free baselines: the caption's mean latent and the mean of all latents. Latents are in the
records' normalized space (variance about 1 per channel).
"""

from absl import flags

from svg_jax import cli

flags.DEFINE_string("records", None, "precomputed records folder (manifest.json + shards)")
flags.DEFINE_string("checkpoint", None, "training workdir of the DiT (EMA params)")
flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
flags.DEFINE_integer("num", 64, "records probed (drawn at random)")
flags.DEFINE_list("times", ["0.02", "0.05", "0.1", "0.2", "0.3", "0.5", "0.7", "0.9"],
                  "flow times t (0 noise, 1 data)")
flags.DEFINE_integer("seed", 0, "record choice and noise")
flags.mark_flags_as_required(["records", "checkpoint"])
FLAGS = flags.FLAGS


def _read_records(folder: str) -> list[dict]:
  from svg_jax.data import records
  out = [rec for _, rec in records.iter_records(folder)]
  if any("text_features" not in r for r in out):
    raise SystemExit(f"{folder}: records without text_features (token-id records need the text "
                     "encoder; probe a feature dataset)")
  return out


def main(argv):
  del argv
  import jax
  import numpy as np

  import denoiser_probe  # research/, beside this script
  from svg_jax.models.nextdit import NextDiT
  from svg_jax import dit_checkpoint

  recs = _read_records(FLAGS.records)
  shapes_seen = {r["latent"].shape for r in recs}
  if len(shapes_seen) != 1:
    raise SystemExit(f"the probe needs one latent shape, the records have {sorted(shapes_seen)}")
  latents = np.stack([r["latent"].astype(np.float32) for r in recs])
  captions = [r["caption"] for r in recs]
  length = max(r["text_features"].shape[0] for r in recs)
  feats = np.zeros((len(recs), length, recs[0]["text_features"].shape[1]), np.float32)
  mask = np.zeros((len(recs), length), bool)
  for i, r in enumerate(recs):
    n = r["text_features"].shape[0]
    feats[i, :n], mask[i, :n] = r["text_features"], True

  cfg = dit_checkpoint.saved_model_config(FLAGS.checkpoint, FLAGS.step)
  params = dit_checkpoint.load_params(FLAGS.checkpoint, cfg, step=FLAGS.step)
  model = NextDiT(cfg)
  apply = jax.jit(lambda x, t, c, m: model.apply({"params": params}, x, t, c, m))

  def velocity(x_t, t, rows):
    return apply(x_t, t, feats[rows], mask[rows])

  rows = np.random.default_rng(FLAGS.seed).choice(len(recs), min(FLAGS.num, len(recs)),
                                                  replace=False)
  table = denoiser_probe.probe(velocity, latents, captions, rows,
                               [float(t) for t in FLAGS.times], seed=FLAGS.seed)
  first = table[0]
  print(f"{len(rows)} records of {len(recs)}; latent variance {float(np.var(latents)):.3f}; "
        f"{first['images_per_caption']:.1f} training images per probed caption; baselines vs x1: "
        f"caption mean {first['caption_mean_vs_x1']:.4f}, mean of all "
        f"{first['global_mean_vs_x1']:.4f}")
  print(f"{'t':>6}{'DiT vs x1':>12}{'posterior vs x1':>18}{'DiT vs posterior':>19}"
        f"{'DiT vs caption mean':>22}")
  for row in table:
    print(f"{row['t']:>6.2f}{row['dit_vs_x1']:>12.4f}{row['posterior_vs_x1']:>18.4f}"
          f"{row['dit_vs_posterior']:>19.4f}{row['dit_vs_caption_mean']:>22.4f}")


if __name__ == "__main__":
  cli.run(main)
