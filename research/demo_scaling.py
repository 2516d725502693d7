"""How the demo's held-out ShapesGenEval score grows with DiT training: the demo pipeline (stages
cached in the workdir, as `launch/demo.py`), then the DiT trained in segments to each of `--steps`
(each segment resumes the last checkpoint, so the run equals one run of the longest length) and
scored after each. Meant for a machine faster than the demo's 2-core CPU (a GPU), to measure what
the 20-minute CPU budget leaves out.

  python research/demo_scaling.py --workdir runs/scaling --steps 1000,3000,10000 [--batch_size 64]

With `--pure_noise` the DiT trains only at flow time t ~ 0 and each step is scored by its
noise-averaged one-step estimate, not by samples: the caption pathway alone
(`research/caption_pathway.py`), which fits the CPU's budget where the whole flow does not.

  python research/demo_scaling.py --workdir runs/demo --pure_noise --seen_prompts \
      --steps 4000,8000,12000,16000

Writes `<workdir>/<dit name>/scaling.json` (score table per step, seconds per segment) and
`<workdir>/<dit name>/eval_<step>/` (grid.png, scores.json).
"""
import json
import os
import time

from absl import app, flags

from svg_jax import cli

flags.DEFINE_string("workdir", "runs/scaling", "demo workdir (data, decoder, records are shared)")
flags.DEFINE_enum("preset", "full", ["small", "full"], "demo preset (svg_jax/demo/configs.py): the "
                  "study below docs/demo.md's candidates was made with full")
flags.DEFINE_integer("num_train", 2000, "demo training images")
flags.DEFINE_integer("num_heldout", 300, "held-out prompts")
flags.DEFINE_integer("decoder_steps", 800, "pixel-decoder training steps")
flags.DEFINE_list("steps", ["1000", "3000", "10000"], "DiT step counts at which to score")
flags.DEFINE_integer("batch_size", 16, "DiT global batch size (the demo's: 16)")
flags.DEFINE_float("lr", None, "DiT learning rate (default: the demo DiT's, "
                   "svg_jax/demo/configs.py)")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                  "DiT matmul inputs (the CPU demo's: float32; bfloat16 for accelerators)")
flags.DEFINE_integer("num_workers", 0, "Grain loader worker processes (config data.num_workers; "
                     "a GPU host's spare cores keep a fast step fed)")
flags.DEFINE_integer("checkpoint_every", 1000, "DiT checkpoint period in steps")
flags.DEFINE_bool("seen_prompts", False, "also score 50 training prompts per category "
                  "(combinations the DiT was trained on)")
flags.DEFINE_enum("text_weights", "word_context", ["word_context", "random"],
                  "demo Gemma-2 weights (launch/demo.py --text_weights)")
flags.DEFINE_bool("pure_noise", False, "train only at flow time t ~ 0 and score the DiT's "
                  "noise-averaged one-step estimate (its caption pathway alone); with "
                  "--seen_prompts also the true caption means")
flags.DEFINE_integer("draws", 16, "noise draws averaged per prompt with --pure_noise")
flags.DEFINE_bool("prepare_only", False, "stop after the cached stages (data, decoder, records)")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from svg_jax.demo import pipeline

  steps = sorted(int(s) for s in FLAGS.steps)
  if not steps or steps[0] <= 0:
    raise app.UsageError(f"--steps must be positive step counts, got {FLAGS.steps}")
  with pipeline.workdir_lock(FLAGS.workdir):  # the demo's: one run writes a workdir at a time
    _study(steps)


def _study(steps):
  import caption_pathway  # research/, beside this script
  from svg_jax.demo import evaluate, geneval, pipeline
  from svg_jax.train import metrics, trainer
  from svg_jax.utils import atomic_files

  metrics.console_logging()
  stages = pipeline.Stages(pipeline.DemoSettings(
      workdir=FLAGS.workdir, preset=FLAGS.preset, num_train=FLAGS.num_train,
      num_heldout=FLAGS.num_heldout, decoder_steps=FLAGS.decoder_steps,
      text_weights=FLAGS.text_weights))
  dec = stages._timed("decoder", stages.train_decoder)
  text_dir = stages._timed("text encoder", lambda: stages.text_encoder(dec))
  records = stages._timed("precompute", lambda: stages.precompute(dec, text_dir))
  if FLAGS.prepare_only:
    return

  config = stages.dit_config(records, dec)
  config.train.global_batch_size = FLAGS.batch_size
  config.train.checkpoint_every = FLAGS.checkpoint_every
  config.model.compute_dtype = FLAGS.compute_dtype
  config.data.num_workers = FLAGS.num_workers
  if FLAGS.lr is not None:
    config.train.lr = FLAGS.lr
  name = f"dit_b{FLAGS.batch_size}_lr{config.train.lr:g}"
  if FLAGS.compute_dtype != "float32":
    name += f"_{FLAGS.compute_dtype}"
  if FLAGS.num_workers:
    name += f"_w{FLAGS.num_workers}"  # a loader state does not resume under another worker count
  if FLAGS.pure_noise:
    caption_pathway.set_pure_noise_times(config)
    name += "_t0"
  dit_dir = os.path.join(stages.workdir, name)
  heldout = stages.heldout(dec)
  seen = stages.seen(dec) if FLAGS.seen_prompts else None
  res = int(dec.data.resolution)

  def score(gen, items, outdir, training_prompts):
    """(scores, extra fields) of one prompt set at one checkpoint."""
    if not FLAGS.pure_noise:
      return evaluate.evaluate(gen, items, (res, res), stages.sampler_settings(),
                               outdir=outdir)[0], {}
    report = caption_pathway.evaluate(gen, items, (res, res), draws=FLAGS.draws, outdir=outdir,
                                      records_dir=records if training_prompts else None)
    return report.pop("scores"), report

  table_path = os.path.join(dit_dir, "scaling.json")
  table = {"rows": []}
  if os.path.exists(table_path):
    with open(table_path) as f:
      table = json.load(f)
  done = {row["step"] for row in table["rows"]}
  for n in steps:
    if n in done:
      continue
    start = time.time()
    config.train.num_steps = n
    summary = trainer.train(config, dit_dir)
    # A run stopped by a signal (a wall-clock `timeout`, preemption) scores the checkpoint it
    # saved, so a time-boxed study still ends with a row, then stops.
    stopped_by = summary.get("stopped_by")
    if stopped_by:
      n = int(summary["step"])
    elif int(summary["step"]) != n:
      raise SystemExit(f"{dit_dir} is already trained to step {summary['step']}, past the "
                       f"milestone {n}: give --steps above it (or a new --workdir)")
    train_s = time.time() - start
    start = time.time()
    gen, _ = stages.generator(dec, text_dir, dit_dir, step=n)
    scores, extra = score(gen, heldout, os.path.join(dit_dir, f"eval_{n}"), False)
    row = {"step": n, "images_seen": n * FLAGS.batch_size, "scores": scores, **extra}
    if seen:
      row["seen_scores"], extra = score(gen, seen, os.path.join(dit_dir, f"seen_{n}"), True)
      row.update({f"seen_{k}": v for k, v in extra.items()})
    last = summary.get("last_record") or {}
    table["rows"].append({**row, "final_loss": last.get("loss"), "train_s": train_s,
                          "eval_s": time.time() - start, "stopped_by": stopped_by})
    table.update(batch_size=FLAGS.batch_size, lr=config.train.lr, num_train=FLAGS.num_train,
                 pure_noise=FLAGS.pure_noise)
    atomic_files.write_text(table_path, json.dumps(table, indent=2))
    print(f"== step {n} ({n * FLAGS.batch_size} images seen):", flush=True)
    geneval.print_table(scores)
    if seen:
      print("training prompts:")
      geneval.print_table(row["seen_scores"])
    if FLAGS.pure_noise:
      print({k: v for k, v in row.items() if "right" in k or "distance" in k})
      if seen:
        print("true caption means of the training prompts:")
        geneval.print_table(row["seen_caption_means_scores"])
    if stopped_by:
      print(f"stopped by {stopped_by} at step {n}; rerun the command to continue", flush=True)
      break
  print(f"{'step':>12} {'overall':>8} {'single':>7} {'two':>6} {'count':>6} {'colors':>7} "
        f"{'pos':>6} {'attr':>6}")
  for row in sorted(table["rows"], key=lambda r: r["step"]):
    for key, label in (("scores", ""), ("seen_scores", " seen")):
      if key in row:
        s = row[key]
        print(f"{row['step']:>7}{label:5} {s['overall']:>8.3f} {s['single_object']:>7.2f} "
              f"{s['two_object']:>6.2f} {s['counting']:>6.2f} {s['colors']:>7.2f} "
              f"{s['position']:>6.2f} {s['color_attr']:>6.2f}")


if __name__ == "__main__":
  cli.run(main)
