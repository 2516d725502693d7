"""The state a training run saved, read back onto a mesh: how the trainer tests check a
checkpoint (a mesh other than the one that saved it included)."""
from svg_jax import checkpoint as ckpt_lib
from svg_jax.train import trainer


def restore_state(config, workdir: str, mesh, step: int | None = None):
  """(state, step): the saved state of `workdir` (newest step by default) for the task of
  `config`, on `mesh`'s shardings."""
  setup = trainer.get(config.task).make_setup(config, mesh)
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
    state, _ = ckpt.restore(step, setup.abstract_state)
    return state, step
  finally:
    ckpt.close()
