"""Print the DiT's parameter overview and total count for a config, allocating nothing (eval_shape).

  python launch/describe.py --config configs/svg_t2i_2b.py:stage1_256
"""
from absl import flags
from ml_collections import config_flags

from svg_jax import cli

config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)


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
