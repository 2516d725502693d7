"""Train a model from an ml_collections config; the same command on a laptop, a GPU or every host
of a TPU pod slice. Resumes from the newest checkpoint in --workdir.

  python launch/train.py --config configs/tiny.py --workdir runs/tiny \
      --config.data.path=/data/demo --config.train.num_steps=200
  python launch/train.py --config configs/decoder.py:tiny --workdir runs/decoder

`task = "dit"` trains the DiT on precomputed records; `task = "decoder"` trains the pixel decoder
behind the frozen DINOv3 on images (the tiny variant's files: launch/make_demo_data.py
--decoder_files, which prints the path flags to add).

Several processes (a pod slice, a GPU cluster, local processes with JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID; docs/pods.md) run this same command; a signal to any of them
stops all of them at the same step.

Exit status: 0 when done or stopped by SIGTERM/SIGINT (after saving), 2 for a bad config (one line
on stderr, nothing compiled) or bad input (one line: a flag, a config file, data that cannot be
used as given, such as a dataset without records), 3 when the loss became NaN/inf (nothing bad
saved), 4 when the workdir's checkpoints cannot resume this run (one line: every step damaged and
moved aside, or a checkpoint of another run left in place: a state of another model or optimizer,
a loader state of another pipeline), 5 when the state or a step does not fit in host or device
memory (one line with what to change; the checkpoints written are intact), 6 when a checkpoint
could not be written (one line: the step, the reason, the newest intact step, which a rerun
resumes from), 7 when a step, a restore or a save waited for `train.stall_timeout_s` (every
thread's stack, then one line), 1 for any other error (its traceback). In a run of several
processes, a process that ends early exits at once rather than in JAX's shutdown barrier: the
others, which may be waiting for it in a collective, are then stopped within
`train.heartbeat_timeout_s`; one of them that ends early after it prints its line too ("process 1
ended before this one, exit 6: ...").
"""
import signal
import sys
import traceback

from absl import app, flags, logging

from svg_jax import cli

cli.define_config_file("config", None, "ml_collections config file")
flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics.jsonl, tensorboard/")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  from svg_jax.train import loop, trainer  # an unknown task is trainer.get's config error
  from svg_jax import input_errors, process_exit
  from svg_jax.utils import error_lines
  from svg_jax.train import metrics
  metrics.console_logging()
  # One line on stderr and an exit status for each way a run ends early (the module docstring).
  # Bad input (a config, a multi-host setup, data) is one line named by its kind.
  early_ends = ((input_errors.InputError, None, 2),
                (loop.TrainingDiverged, "training diverged: ", 3),
                (loop.ResumeError, "resume error: ", 4),
                (loop.OutOfMemory, "out of memory ", 5),
                (loop.CheckpointError, "checkpoint error: ", 6))
  try:
    summary = trainer.train(config, flags.FLAGS.workdir)
  except tuple(kind for kind, _, _ in early_ends) as e:
    prefix, code = next((p, c) for kind, p, c in early_ends if isinstance(e, kind))
    line = (f"{e.kind}: " if prefix is None else prefix) + str(e)
    print(line, file=sys.stderr)
    process_exit.exit_process(code, line)
  except Exception as e:  # noqa: BLE001  (the traceback, then out without waiting for other hosts)
    traceback.print_exc()
    process_exit.exit_process(1, error_lines.first_line(e))
  # Saved and done: a preemption notice that reaches this host late (after the others stopped
  # it) must not turn the exit status of a finished run into a kill.
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  logging.info("finished: %s", {k: v for k, v in summary.items() if k != "last_record"})


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(main)
