"""Precompute training records: images + captions -> DINOv3 latents + Gemma-2 features.

  python launch/precompute.py --input data/train.jsonl --input_format jsonl --out /data/records \
      --config.autoencoder.encoder_path=dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth \
      --config.precompute.text_encoder_dir=gemma-2-2b --config.precompute.resolution=256

--config defaults to configs/precompute.py (`autoencoder` + `precompute` sections); another config
file needs an `autoencoder` section and may have a `precompute` one.
Rerun the same command to resume: finished chunks are skipped. On a multi-host job run it on
every host; each process does its share and the last to finish writes manifest.json.
Exit status 0 also when some inputs were bad (they are listed in the summary and manifest.json);
2, with one line on stderr, for a bad flag, config or input (one that does not exist, holds no
usable input, or none of whose inputs gave a record), an --out that cannot be written, another
run of the same process on --out, or a write the file system refuses (a full disk); 130, with one
line, after Ctrl-C. After any of them, rerunning the same command resumes.
"""
import os
import sys

from absl import app, flags

from svg_jax import cli

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

cli.define_config_file("config", os.path.join(_REPO, "configs", "precompute.py"),
                       "ml_collections config file with `autoencoder` and `precompute` sections")
flags.DEFINE_string("input", None, "a jsonl file, an image folder, or a TFDS dataset name")
flags.DEFINE_enum("input_format", "jsonl", ["jsonl", "folder", "tfds"], "kind of --input")
flags.DEFINE_string("out", None, "output folder (shards, manifest.json, empty_text.npy)")
flags.mark_flags_as_required(["input", "out"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from svg_jax import multihost, precompute, process_exit

  config = FLAGS.config
  if "precompute" not in config or config.precompute.process_count < 0:
    multihost.initialize_distributed()  # multi-host: jax.process_index() splits the chunks
  if "autoencoder" not in config:
    raise app.UsageError("the config has no `autoencoder` section")
  try:
    precompute.run_job(config, FLAGS.input, FLAGS.input_format, FLAGS.out)
  except precompute.Interrupted as e:
    print(e, file=sys.stderr)
    process_exit.exit_process(cli.EXIT_INTERRUPTED, str(e))


if __name__ == "__main__":
  cli.run(main)
