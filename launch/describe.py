"""Print the DiT's parameter overview and total count for a config, allocating nothing (eval_shape).

  python launch/describe.py --config configs/svg_t2i_2b.py:stage1_256
"""
from absl import flags

from svg_jax import cli

cli.define_config_file("config", None, "ml_collections config file")


def main(argv):
  del argv
  import flax
  from clu import parameter_overview

  from svg_jax import config as config_lib
  from svg_jax.models import nextdit

  cfg = config_lib.nextdit_config(flags.FLAGS.config)
  params = flax.linen.meta.unbox(nextdit.abstract_params(cfg))
  print(parameter_overview.get_parameter_overview(params, include_stats=False))
  print(f"total parameters: {nextdit.count_params(params)}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main)
