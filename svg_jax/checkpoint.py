"""Orbax checkpoints of a training run: items `state`, `data_iter` (per process) and `config`.

Layout: `<workdir>/checkpoints/<step>/{state, data_iter, config}`. Orbax writes each step into a
temporary directory and renames it when complete, so a crash mid-save leaves the previous
checkpoints intact and the partial one invisible. Saves are asynchronous (the device -> host copy
happens inside `save`, the file writes in the background) and keep the newest `keep` steps.
`data_iter` holds one JSON file per process, `process_<i>-of-<P>.json` (the file names of Grain's
own handler, so older checkpoints read the same); `DataIterHandler` restores them into a run of
any process count (an iterator with `set_state_of_processes`, svg_jax/data/pipeline.py; others
only into the same count).

A damaged step (a truncated or missing file) is found by `problems` (every file a restore reads is
there and the JSON items parse) or by the restore itself; `move_aside` moves its folder to
`<workdir>/damaged_checkpoints/` so the previous step becomes the newest (svg_jax/train/loop.py).
A step of another run (a state with other leaves, or leaves of other shapes or dtypes: another
model or optimizer) is told from its metadata before any array is read, `IncompatibleCheckpoint`,
and never taken for damage.

Restoring takes an abstract target tree whose leaves carry the *target* shardings, so a checkpoint
written on one mesh restores onto any other. `load_state_item` reads one entry of the saved state
(`load_params`: the params of another run, for stage transitions with `train.init_from`;
`place_params` puts converted weights onto the same shardings).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from svg_jax import save_failure_reports
from svg_jax.utils.error_lines import first_line

log = logging.getLogger(__name__)

ITEMS = ("state", "data_iter", "config")
SUBDIR = "checkpoints"
DAMAGED_SUBDIR = "damaged_checkpoints"
_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), SUBDIR)


class SaveFailed(RuntimeError):
  """A checkpoint could not be written (one line: which step, where, why); the steps committed
  before it are intact."""


class IncompatibleCheckpoint(ValueError):
  """An intact checkpoint this run cannot read (another loader format or pipeline, or another
  model's parameters)."""


def _data_files(directory) -> dict[int, dict[int, str]]:
  """{process count: {process index: file name}} of a data_iter folder."""
  out: dict[int, dict[int, str]] = {}
  for name in os.listdir(directory):
    m = _DATA_FILE.match(name)
    if m:
      out.setdefault(int(m.group(2)), {})[int(m.group(1))] = name
  return out


def read_data_states(directory) -> list[dict]:
  """The loader states of a data_iter folder, one per saving process (index order); one line
  naming the file when one is missing or unreadable."""
  directory = os.fspath(directory)
  files = _data_files(directory)
  if not files:
    raise FileNotFoundError(f"{directory}: no process_<i>-of-<P>.json loader-state file")
  if len(files) > 1:
    raise FileNotFoundError(f"{directory}: loader-state files of several process counts "
                            f"{sorted(files)}")
  (count, names), = files.items()
  missing = [f"process_{i}-of-{count}.json" for i in range(count) if i not in names]
  if missing:
    raise FileNotFoundError(f"{directory}: missing {', '.join(missing)}")
  states = []
  for i in range(count):
    path = os.path.join(directory, names[i])
    try:
      with open(path) as f:
        states.append(json.load(f))
    except (OSError, ValueError) as e:
      raise ValueError(f"{path} is unreadable: {type(e).__name__}: {e}") from None
  return states


class DataIterHandler(ocp.CheckpointHandler):
  """Orbax handler of the loader state: each process writes its iterator's `get_state()` as
  `process_<i>-of-<P>.json`; a restore reads its own file when the process count is the same,
  else all files through the iterator's `set_state_of_processes`. A state the iterator refuses
  raises `IncompatibleCheckpoint`."""

  def save(self, directory: epath.Path, args: DataIterSave) -> None:
    state = json.dumps(args.item.get_state(), indent=1)
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    (epath.Path(directory) / name).write_text(state)

  def restore(self, directory: epath.Path, args: DataIterRestore):
    item = args.item
    states = read_data_states(directory)
    index, count = jax.process_index(), jax.process_count()
    try:
      if len(states) == count:
        item.set_state(states[index])
      elif hasattr(item, "set_state_of_processes"):
        item.set_state_of_processes(states, index)
      else:
        raise ValueError(f"this loader's state was saved by {len(states)} processes and resumes "
                         f"only with as many (this run has {count})")
    except (ValueError, KeyError, TypeError) as e:
      raise IncompatibleCheckpoint(f"the loader state in {directory}: {e}") from None
    try:
      getattr(item, "start_prefetch", lambda: None)()
    except NotImplementedError:  # grain < 0.2.15 (Python 3.10's): no prefetch to start early
      pass
    return item

  def metadata(self, directory: epath.Path) -> None:
    del directory

  def finalize(self, directory: epath.Path) -> None:
    del directory

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(DataIterHandler, for_save=True)
@dataclasses.dataclass
class DataIterSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataIterHandler, for_restore=True)
@dataclasses.dataclass
class DataIterRestore(ocp.args.CheckpointArgs):
  item: Any


if not hasattr(jax, "set_mesh"):
  # jax < 0.7.1 (the stack of Python 3.10) with orbax 0.11: its replica-parallel save leaves a
  # one-device mesh set for good, which the next step's device code then trips over.
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class _DrainingEventLoop(asyncio.SelectorEventLoop):
  """An event loop that lets its unfinished tasks end before it closes. orbax reads every array
  of a restore at once in a fresh loop and closes it on the first read that fails; the reads
  still running then fail into the closed loop, each with its traceback ("Task exception was
  never retrieved", "Event loop is closed"): thousands of lines for one damaged file. Cancelled
  and awaited here, they end quietly, and the first error is the one reported."""

  def close(self) -> None:
    if not self.is_running() and not self.is_closed():
      unfinished = asyncio.all_tasks(self)
      for task in unfinished:
        task.cancel()
      if unfinished:
        self.run_until_complete(asyncio.gather(*unfinished, return_exceptions=True))
    super().close()


class _DrainingLoopPolicy(asyncio.DefaultEventLoopPolicy):
  """The default policy, whose new loops drain when closed."""

  def new_event_loop(self) -> asyncio.AbstractEventLoop:
    return _DrainingEventLoop()


@contextlib.contextmanager
def _draining_event_loops():
  """orbax's restores make their loops with `asyncio.new_event_loop`, which asks the policy."""
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_DrainingLoopPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with the three items of a training run (the
  manager saves and lists the steps; `restore` reads through the items' handlers)."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep and keep > 0 else None, create=not read_only,
        enable_async_checkpointing=async_save, read_only=read_only)
    self._writing = None  # the step of the newest save started
    if not read_only:
      save_failure_reports.shorten(os.path.dirname(self.directory), jax.process_index())
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=ITEMS, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data_iter": DataIterHandler(),
                       "config": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iter, config_dict: dict) -> None:
    """Starts writing step `step` (the files are written in the background); SaveFailed when
    this or the previous asynchronous save failed (naming the step that failed)."""
    self.wait()  # as orbax's save would first: an error of the previous write is that step's
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data_iter=DataIterSave(data_iter),
          config=ocp.args.JsonSave(config_dict)), force=True)
    except Exception as e:  # noqa: BLE001  (the caller reports it in one line)
      raise self._failed(e, step) from e
    self._writing = step

  def saving(self) -> bool:
    """Whether an asynchronous save has not committed yet."""
    return self.manager.is_saving_in_progress()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def problems(self, step: int, data_iter: bool = True) -> list[str]:
    """What is missing or unreadable in step `step`'s folder, found without reading arrays:
    the same answer on every process of a run over a shared filesystem."""
    folder = self.step_dir(step)
    out = []
    for item, needed in (("state", ("manifest.ocdbt", "_METADATA")), ("config", ())):
      path = os.path.join(folder, item)
      if not os.path.isdir(path):
        out.append(f"{item}/ is missing")
      out += [f"{item}/{n} is missing" for n in needed if os.path.isdir(path)
              and not os.path.exists(os.path.join(path, n))]
    config = os.path.join(folder, "config")
    for name in sorted(os.listdir(config)) if os.path.isdir(config) else ():
      if name.endswith(".json"):
        try:
          with open(os.path.join(config, name)) as f:
            json.load(f)
        except (OSError, ValueError) as e:
          out.append(f"config/{name} is unreadable ({type(e).__name__})")
    if data_iter:
      path = os.path.join(folder, "data_iter")
      try:
        read_data_states(path)
      except (OSError, ValueError) as e:
        out.append(str(e).replace(path + ": ", "data_iter: ").replace(folder + os.sep, ""))
    return out

  def move_aside(self, step: int) -> str:
    """Moves step `step`'s folder to `<workdir>/damaged_checkpoints/<step>[.n]` (never deletes
    it) and forgets the step; returns the new path."""
    target_dir = os.path.join(os.path.dirname(self.directory), DAMAGED_SUBDIR)
    os.makedirs(target_dir, exist_ok=True)
    target, n = os.path.join(target_dir, str(step)), 1
    while os.path.exists(target):
      target, n = os.path.join(target_dir, f"{step}.{n}"), n + 1
    shutil.move(self.step_dir(step), target)
    return target

  def reload(self) -> None:
    """Re-reads the step list (after another process moved a step aside)."""
    self.manager.reload()

  def restore(self, step: int, abstract_state, data_iter=None):
    """Restores `state` onto the shardings of `abstract_state` (ShapeDtypeStructs with sharding)
    and, when given, sets `data_iter` to its saved position. Returns (state, saved config dict).

    Each process only reads: the items go through orbax's handlers, not the manager, whose
    restore ends in a barrier of all processes. A process whose read failed (a damaged shard of
    an FSDP checkpoint is read by one host only) never reached that barrier and left the others
    waiting in it; the caller agrees on the outcome instead (svg_jax/train/loop.py).

    IncompatibleCheckpoint, before any array is read, when the saved state has other leaves, or
    leaves of other shapes or dtypes, than `abstract_state` (a run of another config)."""
    folder = epath.Path(self.step_dir(step))
    state_handler = ocp.StandardCheckpointHandler()
    try:
      # Another model's or optimizer's state is told from the saved metadata: its restore would
      # fail on a mis-shaped array just as a damaged file fails.
      _check_same_tree(_saved_tree(state_handler, folder / "state"), abstract_state,
                       f"the arrays of step {step}", dtypes=True)
      with _draining_event_loops():
        state = state_handler.restore(folder / "state",
                                      args=ocp.args.StandardRestore(abstract_state))
    finally:
      state_handler.close()
    config = self.read_config(step)
    if data_iter is not None:
      DataIterHandler().restore(folder / "data_iter", DataIterRestore(data_iter))
    return state, config

  def read_config(self, step: int) -> dict:
    """The config dict saved with step `step` (read by this process alone, as `restore` reads)."""
    return read_saved_config(self.directory, step)

  def committed_steps(self) -> list[int]:
    """The steps whose folders are complete on disk (read from the folder, not the manager's
    list, which names a step as soon as its save starts)."""
    return finished_steps(self.directory)

  def _failed(self, error: Exception, step: int) -> SaveFailed:
    save_failure_reports.drop_reports_of_writes_into(self.directory)
    reason = first_line(error)
    try:  # an earlier save may still be writing: it decides which step is the newest intact one
      self.manager.wait_until_finished()
    except Exception:  # noqa: BLE001  (that error, or this one again: the listing tells)
      pass
    committed = self.committed_steps()
    intact = (f"the checkpoints up to step {committed[-1]} are intact" if committed else
              "no earlier checkpoint was written")
    return SaveFailed(f"writing checkpoint {step} to {self.directory} failed ({reason}); {intact}")

  def wait(self) -> None:
    """Waits for the asynchronous save; SaveFailed when it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001  (the caller reports it in one line)
      raise self._failed(e, self._writing) from e

  def close(self) -> None:
    self.wait()
    self.manager.close()


def finished_steps(directory: str) -> list[int]:
  """The steps whose folders in a `checkpoints` folder are complete on disk, oldest first."""
  return sorted(ocp.utils.checkpoint_steps(directory)) if os.path.isdir(directory) else []


def read_saved_config(directory: str, step: int) -> dict:
  """The config dict saved with step `step` in a `checkpoints` folder."""
  return ocp.JsonCheckpointHandler().restore(epath.Path(directory) / str(step) / "config",
                                             args=ocp.args.JsonRestore())


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


def source_step(source: str, step: int | None = None, *,
                what: str = "checkpoint") -> tuple[str, int]:
  """(`checkpoints` folder, step) of a run's workdir or its `checkpoints` folder: `step`, or the
  newest finished one (None). FileNotFoundError prefixed `what:` naming the folder when there is
  no such checkpoint. A listing only: no manager, whose constructor waits for every process."""
  directory = source if os.path.basename(os.path.normpath(source)) == SUBDIR else checkpoint_dir(
      source)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{what}: no checkpoint folder at {directory}")
  steps = finished_steps(directory)
  try:
    return directory, resolve_step(max(steps, default=None), step, steps, directory)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{what}: {e}") from None


def load_state_item(source: str, item: str, abstract, step: int | None = None, *,
                    what: str = "checkpoint", task: str | None = None):
  """One entry of a run's saved `state` (`params`, `ema_params`, ...) of step `step` (default:
  the newest), from its workdir or its `checkpoints` folder, placed on the shardings of
  `abstract`; nothing else of the state is read.

  Each process only reads, with no barrier (orbax's handler, not its manager, whose restore ends
  in a barrier of all processes that a process whose read failed never reaches): a
  multi-process caller agrees on the outcome (svg_jax/train/loop.py).

  Raises FileNotFoundError naming the folder when it holds no such checkpoint, and
  IncompatibleCheckpoint (prefixed `what:`) when the run's saved config names another `task`
  than `task` (when given), or listing the mismatched entries when the trees differ.
  """
  out, step, directory = _load_state_item(source, item, abstract, step, what=what, task=task)
  log.info("%s: loaded %s of step %d from %s", what, item, step, directory)
  return out


def _load_state_item(source: str, item: str, abstract, step: int | None, *, what: str,
                     task: str | None):
  """`load_state_item`'s (entry, step read, `checkpoints` folder), logging nothing."""
  directory, step = source_step(source, step, what=what)
  if task is not None:
    saved_task = _saved_task(directory, step)
    if saved_task not in (None, task):
      raise IncompatibleCheckpoint(f"{what}: {source} is a `task = \"{saved_task}\"` training "
                                   f"run, not a \"{task}\" one")
  folder = epath.Path(directory) / str(step) / "state"
  handler = ocp.PyTreeCheckpointHandler()
  try:
    saved = _saved_tree(handler, folder)
    if item not in saved:
      raise IncompatibleCheckpoint(f"{what}: the checkpoint of step {step} in {directory} has no "
                                   f"`{item}` (it holds {sorted(saved)})")
    _check_same_tree(saved[item], abstract, f"{what}: the checkpoint's {item}")
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
        abstract)
    with _draining_event_loops():
      out = handler.restore(folder, args=ocp.args.PyTreeRestore(
          item={item: abstract}, restore_args={item: restore_args}, partial_restore=True))
  finally:
    handler.close()
  return out[item], step, directory


def load_params(source: str, abstract_params, step: int | None = None, *,
                task: str | None = None):
  """(params, step read) of another run's checkpoint of `task`, `step` or the newest (stage
  transitions: `train.init_from`, whose loop logs what it loaded); the optimizer state and EMA
  of that run are not read."""
  params, step, _ = _load_state_item(source, "params", abstract_params, step,
                                     what="train.init_from", task=task)
  return params, step


def place_params(tree, abstract, what: str):
  """Host arrays `tree` (nested dicts of numpy arrays: converted weights) placed on the
  shardings of `abstract` (ShapeDtypeStructs), each process making only its own shards: what
  `load_params` gives for a checkpoint. IncompatibleCheckpoint (`what` ...) when the leaves or
  their shapes differ."""
  _check_same_tree(tree, abstract, what)
  host = _flat(tree)

  def put(path, leaf):
    array = np.asarray(host[_leaf_name(path)], leaf.dtype)
    return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index: array[index])

  return jax.tree_util.tree_map_with_path(put, abstract)


def _saved_task(directory: str, step: int) -> str | None:
  """The `task` of a step's saved config ("dit" for runs saved before the field), None when the
  config cannot be read (the params' own check then says what does not fit)."""
  try:
    saved = read_saved_config(directory, step)
  except Exception:  # noqa: BLE001  (a missing or damaged config: only the hint is lost)
    return None
  return saved.get("task", "dit") if isinstance(saved, dict) else None


def _saved_tree(handler, folder):
  """The tree of the saved arrays' metadata (shapes, dtypes), read from the folder's metadata
  file without reading an array."""
  meta = handler.metadata(folder)
  return meta.tree if hasattr(meta, "tree") else meta  # an older orbax gives the tree itself


def _leaf_name(path) -> str:
  """`params/layers_0/attention/qkv/kernel`: one name for a leaf of the saved tree (dicts and
  lists) and of the tree restored into (dataclasses, named tuples and tuples)."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _flat(tree) -> dict[str, Any]:
  return {_leaf_name(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


_DIFFERENCES_SHOWN = 3  # in an error line; the rest are counted


def _check_same_tree(saved, target, what: str, *, dtypes: bool = False) -> None:
  """IncompatibleCheckpoint naming the first leaves where `saved` (orbax's metadata) and `target`
  (ShapeDtypeStructs) differ: a leaf only one of them has, another shape, another dtype (only
  with `dtypes`: a restore would cast it silently)."""
  saved_f, target_f = _flat(saved), _flat(target)

  def described(leaf) -> str:
    if leaf is None:
      return "absent"
    shape = tuple(getattr(leaf, "shape", ()))
    return f"{shape} {getattr(leaf, 'dtype', '?')}" if dtypes else str(shape)

  names = [*target_f, *(k for k in saved_f if k not in target_f)]  # this run's order first
  pairs = ((k, described(saved_f.get(k)), described(target_f.get(k))) for k in names)
  differences = [f"{k}: checkpoint {s} vs this run {t}" for k, s, t in pairs if s != t]
  if differences:
    shown = "; ".join(differences[:_DIFFERENCES_SHOWN])
    rest = len(differences) - _DIFFERENCES_SHOWN
    raise IncompatibleCheckpoint(f"{what} do not fit this run: {len(differences)} of "
                                 f"{len(names)} arrays differ ({shown}"
                                 f"{f'; {rest} more' if rest > 0 else ''})")


def config_to_json(config) -> dict:
  """The config as a JSON-able dict (tuples become lists)."""
  return json.loads(json.dumps(config.to_dict(), default=list))


def flat_config(tree: dict, prefix: str = "") -> dict[str, Any]:
  """A nested config dict (`config_to_json`'s) as {"section.field": value}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flat_config(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out
