"""Orbax checkpoints of a training run: items `state`, `data_iter` (per process) and `config`.

Layout: `<workdir>/checkpoints/<step>/{state, data_iter, config}`. Orbax writes each step into a
temporary directory and renames it when complete, so a crash mid-save leaves the previous
checkpoints intact and the partial one invisible. Saves are asynchronous (the device -> host copy
happens inside `save`, the file writes in the background), keep the newest `keep` steps, and
`data_iter` holds one JSON file per process (Grain's checkpoint handler), so every host resumes its
own slice of the data at the exact next batch.

Restoring takes an abstract target tree whose leaves carry the *target* shardings, so a checkpoint
written on one mesh restores onto any other. `load_state_item` reads one entry of the saved state
(`load_params`: the params of another run, for stage transitions with `train.init_from`).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

ITEMS = ("state", "data_iter", "config")
SUBDIR = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), SUBDIR)


def _abstract(tree, shardings=None):
  """ShapeDtypeStructs with target shardings (restore places every array where it belongs)."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with the three items of a training run."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep and keep > 0 else None, create=not read_only,
        enable_async_checkpointing=async_save, read_only=read_only)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=ITEMS, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data_iter": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iter, config_dict: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=grain.checkpoint.CheckpointSave(data_iter),
        config=ocp.args.JsonSave(config_dict)), force=True)

  def restore(self, step: int, abstract_state, data_iter=None):
    """Restores `state` onto the shardings of `abstract_state` (ShapeDtypeStructs with sharding)
    and, when given, sets `data_iter` to its saved position. Returns (state, saved config dict)."""
    args = {"state": ocp.args.StandardRestore(abstract_state),
            "config": ocp.args.JsonRestore()}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    return out["state"], out["config"]

  def read_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def resolve_step(latest: int | None, step: int | None, all_steps, directory: str) -> int:
  """`step`, or the newest when None; FileNotFoundError naming the folder when there is none."""
  if latest is None:
    raise FileNotFoundError(f"no finished checkpoint in {directory}")
  if step is None:
    return latest
  if step not in all_steps:
    raise FileNotFoundError(f"no checkpoint of step {step} in {directory} (steps: "
                            f"{sorted(all_steps)})")
  return step


def load_state_item(source: str, item: str, abstract, step: int | None = None, *,
                    what: str = "checkpoint"):
  """One entry of a run's saved `state` (`params`, `ema_params`, ...) of step `step` (default:
  the newest), from its workdir or its `checkpoints` folder, placed on the shardings of
  `abstract`; nothing else of the state is read.

  Raises FileNotFoundError naming the folder when it holds no such checkpoint, and ValueError
  (prefixed `what:`) listing the mismatched entries when the trees differ.
  """
  directory = source if os.path.basename(os.path.normpath(source)) == SUBDIR else checkpoint_dir(
      source)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{what}: no checkpoint folder at {directory}")
  manager = ocp.CheckpointManager(
      directory, item_names=ITEMS, options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  try:
    try:
      step = resolve_step(manager.latest_step(), step, list(manager.all_steps()), directory)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"{what}: {e}") from None
    meta = manager.item_metadata(step)["state"]
    saved = meta.tree if hasattr(meta, "tree") else meta
    if item not in saved:
      raise ValueError(f"{what}: the checkpoint of step {step} in {directory} has no `{item}` (it "
                       f"holds {sorted(saved)})")
    _check_same_tree(saved[item], abstract, f"{what}: the checkpoint's {item}")
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
        abstract)
    out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={item: abstract}, restore_args={item: restore_args}, partial_restore=True)))
    log.info("%s: loaded %s of step %d from %s", what, item, step, directory)
    return out["state"][item]
  finally:
    manager.close()


def load_params(source: str, abstract_params, step: int | None = None):
  """The `params` of another run's checkpoint (stage transitions: `train.init_from`); the
  optimizer state and EMA of that run are not read."""
  return load_state_item(source, "params", abstract_params, step, what="init_from")


def _flat(tree) -> dict[str, Any]:
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_same_tree(saved, target, what: str) -> None:
  saved_f, target_f = _flat(saved), _flat(target)
  missing = sorted(set(target_f) - set(saved_f))
  unexpected = sorted(set(saved_f) - set(target_f))
  shapes = sorted(f"{k}: saved {tuple(saved_f[k].shape)}, model {tuple(target_f[k].shape)}"
                  for k in set(saved_f) & set(target_f)
                  if tuple(saved_f[k].shape) != tuple(target_f[k].shape))
  if missing or unexpected or shapes:
    raise ValueError(f"{what} do not fit the model: missing {missing}; unexpected {unexpected}; "
                     f"mis-shaped {shapes}")


def config_to_json(config) -> dict:
  """The config as a JSON-able dict (tuples become lists)."""
  return json.loads(json.dumps(config.to_dict(), default=list))
