"""Where the device time of a profiled window went: time per step by class of HLO op (matmul,
attention, collective, copy, reduction, elementwise) and the costliest ops.

  python launch/profile_summary.py <workdir>/tensorboard --steps 3 [--top 25]

The argument is a trace file (`*.xplane.pb`) or a folder holding one (the newest is read): the
trainer writes one with train.profile_steps (it logs this summary too), bench/trainer.py with
--profile_steps. --steps: how many steps the trace holds (the per-step figures divide by it).
"""
from absl import app, flags

from svg_jax import cli

flags.DEFINE_integer("steps", 1, "steps the trace holds")
flags.DEFINE_integer("top", 20, "ops to list")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("give one trace file or folder")
  from svg_jax import input_errors
  from svg_jax.train import profiling  # JAX after cli.run's process setup
  try:
    path = profiling.latest_trace(argv[1])
  except FileNotFoundError as e:  # a path the user gave
    raise input_errors.MissingInput(str(e)) from None
  print(profiling.report(path, FLAGS.steps, FLAGS.top))


if __name__ == "__main__":
  cli.run(main)
