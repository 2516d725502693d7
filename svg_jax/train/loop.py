"""The training loop of every task: `train(config, workdir, task)`.

A task (the interface: svg_jax/train/task_api.py; the tasks: dit_task.py, decoder_task.py) brings
what differs: its config checks and its setup (model, state, jitted step, data, logger,
evaluation). The loop brings what is shared: resume, signals, NaN stop, checkpoints, metrics. It
never names a task: svg_jax/train/trainer.py looks `config.task` up and passes the task in.

Order of work (nothing compiles before the config has been checked):
  1. `validate_config`: one `ConfigError` line listing every problem (mesh vs devices, batch vs
     data axes and micro-batches, schedule names, ..., then the task's own: data path / manifest
     vs model dims, ...).
  2. Mesh; the task's choices that need it (`Task.resolve_config`: the DiT's remat "auto",
     svg_jax/train/remat.py); the task's setup: abstract state with `jax.eval_shape` (params keep
     their logical axis names, so the optimizer moments and EMA inherit the parameter shardings);
     a jitted init with out_shardings materializes every array directly in its shards.
  3. Auto-resume from the newest checkpoint in `workdir` (state onto this run's shardings, data
     iterator at its saved position, also from a run of another process count; one line lists
     the config fields changed since that checkpoint was saved, `train.init_from` is ignored and
     never looked at); otherwise `train.init_from` params (a workdir's step, or a weights file of
     `train.init_from_format` read by the task; one that cannot be read or does not fit the
     model is the same one-line ConfigError on every process), otherwise a fresh init. A newest
     step that cannot be restored (a truncated or missing file) is logged in one line, moved to
     `<workdir>/damaged_checkpoints/` and the previous step is restored: a damaged checkpoint
     costs one interval, not the run. A checkpoint of another run (another model or optimizer,
     told from its metadata; another loader pipeline) is a one-line `ResumeError`, and stays.
  4. Steps: jit(train_step) with explicit in/out shardings and the state donated, compiled ahead
     for each batch shape (`TaskSetup.compile_step`; with the first batch, the evaluation's
     programs too: `TaskSetup.compile_eval`). Every host then waits for the others' compiles
     before the first run, so the stall watch never times a compile. (The hosts' first
     collective comes before anything compiles: on CPU it makes Gloo's context, whose 30 s
     timeout a host's longer compile must not run into.) The step rng is
     fold_in(PRNGKey(seed), step), so a resumed run draws what the uninterrupted run drew. A
     state or step that does not fit in memory ends the run with `OutOfMemory`, one line saying
     what to change; the checkpoints already written are intact.
  5. Metrics are fetched lazily (at log and checkpoint steps) so the host does not wait on every
     step; a NaN/inf loss or grad norm stops the run with `TrainingDiverged` *before* the state is
     saved, so the newest checkpoint is always a good one; metrics.jsonl ends with a "diverged"
     event (the stall watch's exit 7 with a "stalled" one; a run that reached `train.num_steps`
     with a "finished" one), so a dead run is told from a slow one.
  6. `train.profile_steps` steps after the first `train.profile_start` are traced with
     jax.profiler into <workdir>/tensorboard and summarized in the log (svg_jax/train/profiling.py).
  7. Checkpoints every `checkpoint_every` steps, at the end, and after SIGTERM/SIGINT (then `train`
     returns normally: preemption exits 0); none at all with `checkpoint_every = 0` (benchmarks).
     The "checkpoint" event of metrics.jsonl is written once the asynchronous save has committed.
     A save that fails (a full disk, a filesystem error) ends the run with `CheckpointError`, one
     line naming the step and the newest intact one, which a rerun resumes from.
  8. Several processes stop at the same step: a signal on any process is seen by all of them at
     the same step boundary (`_StopAgreement`), so all save that step together and exit 0.
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import parameter_overview
from jax.sharding import NamedSharding, PartitionSpec

from svg_jax import input_errors, multihost, parallel
from svg_jax import checkpoint as ckpt_lib
from svg_jax.train import chip_specs
from svg_jax.train import host_consistency
from svg_jax.train import metrics as metrics_lib
from svg_jax.train import profiling
from svg_jax.train import state as state_lib
from svg_jax.train import stall_watch
from svg_jax.input_errors import InputError
from svg_jax.train.task_api import Task
from svg_jax.utils import writable_folders
from svg_jax.utils.error_lines import first_line, out_of_memory_line


class ConfigError(InputError):
  """The config cannot run; the message is one line naming every problem (bad input: exit 2 in
  the scripts, `cli.run`)."""
  kind = "config error"


class DataError(InputError):
  """The data failed in mid-run (images gone, too many bad ones in a row): one line, exit 2."""
  kind = "data error"


class TrainingDiverged(RuntimeError):
  """A non-finite loss or gradient norm; the bad state was not saved."""


class ResumeError(RuntimeError):
  """The workdir's checkpoints cannot resume this run (one line: which folder and why)."""


class CheckpointError(RuntimeError):
  """A checkpoint could not be written (one line: which step, where, why); the checkpoints
  committed before it are intact, and a rerun resumes from the newest of them."""


class OutOfMemory(RuntimeError):
  """The run did not fit in host or device memory (one line: where, XLA's reason, what to change);
  the checkpoints already written are intact."""


def _range_problems(config) -> list[str]:
  """Numeric fields of the loop's sections outside their valid ranges."""
  t = config.train
  out = []

  def check(name, ok, rule):
    if not ok:
      out.append(f"train.{name} must be {rule}, got {t[name]}")

  check("global_batch_size", int(t.global_batch_size) >= 1, ">= 1")
  check("lr", float(t.lr) > 0, "> 0")
  for name in ("b1", "b2"):
    check(name, 0 <= float(t[name]) < 1, "in [0, 1)")
  check("eps", float(t.eps) >= 0, ">= 0")
  check("weight_decay", float(t.weight_decay) >= 0, ">= 0")
  check("grad_clip", float(t.grad_clip) >= 0, ">= 0 (0 turns clipping off)")
  check("warmup_steps", int(t.warmup_steps) >= 0, ">= 0")
  check("lr_end", 0 <= float(t.lr_end) <= float(t.lr), "in [0, train.lr]")
  # A cosine schedule decays over num_steps - warmup_steps. (A warmup_constant run shorter than
  # its warmup is a smoke test, e.g. of the demo config, and stays allowed.)
  if t.lr_schedule == "warmup_cosine" and int(t.warmup_steps) >= int(t.num_steps) >= 1:
    out.append(f"train.warmup_steps {t.warmup_steps} must be below train.num_steps "
               f"{t.num_steps} for the warmup_cosine schedule (nothing would be left to decay)")
  check("keep_checkpoints", int(t.keep_checkpoints) >= 0, ">= 0 (0 keeps all)")
  check("stall_timeout_s", float(t.stall_timeout_s) >= 0, ">= 0 (0 turns the watch off)")
  check("debug_nan_step", int(t.debug_nan_step) == -1 or int(t.debug_nan_step) >= 1,
        "-1 (off) or a step >= 1")
  return out


# `train.init_from_format`s besides "" (a training workdir): the formats of the weight readers
# (svg_jax/convert/dit_io.py, decoder_io.py; a test keeps them equal).
INIT_FORMATS = ("flax", "official", "safetensors", "diffusers")
_FILE_FORMATS = ("flax", "official", "safetensors")  # one file (diffusers: a folder)


def _resumes(workdir: str | None) -> bool:
  """Whether `workdir` has a finished checkpoint, which the run resumes (train.init_from unread)."""
  return workdir is not None and bool(ckpt_lib.finished_steps(ckpt_lib.checkpoint_dir(workdir)))


def _init_from_problems(t, workdir: str | None) -> list[str]:
  """`train.init_from*` fields that cannot start a run. The source itself is looked at only when
  it will be read: a run that resumes its workdir does not need it (an earlier stage's workdir
  may be gone by then)."""
  fmt, step, source = t.init_from_format, int(t.init_from_step), t.init_from
  out = []
  if fmt and fmt not in INIT_FORMATS:
    out.append(f"train.init_from_format {fmt!r} is not one of {('',) + INIT_FORMATS} (\"\": a "
               "training workdir)")
  if step < -1:
    out.append(f"train.init_from_step must be -1 (the newest) or a step >= 0, got {step}")
  elif step != -1 and fmt:
    out.append(f"train.init_from_step {step} picks a checkpoint of a training workdir; {fmt} "
               "weights have no steps (leave it -1)")
  if not source or out or _resumes(workdir):
    return out
  if not os.path.exists(source):
    out.append(f"train.init_from {source!r} does not exist")
  elif not fmt and not os.path.isdir(source):
    out.append(f"train.init_from {source!r} is a file, not a training workdir: set "
               f"train.init_from_format to its format (one of {INIT_FORMATS})")
  elif fmt in _FILE_FORMATS and os.path.isdir(source):
    hint = (" (a training workdir is read with train.init_from_format \"\")" if
            os.path.isdir(ckpt_lib.checkpoint_dir(source)) else "")
    out.append(f"train.init_from {source!r} is a folder; the {fmt} format is one file{hint}")
  return out


def validate_config(config, task: Task, num_devices: int | None = None,
                    process_count: int | None = None,
                    workdir: str | None = None) -> tuple[int, ...]:
  """Checks everything that can be checked without compiling; returns the mesh shape. With the
  run's `workdir`, `train.init_from` is checked only when the workdir has no checkpoint to
  resume."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  problems: list[str] = []
  if config.task != task.name:
    problems.append(f"config.task {config.task!r} is not the task {task.name!r} given to the loop")
  shape = None
  try:
    shape = parallel.mesh_shape(dict(config.mesh), num_devices)
  except ValueError as e:
    problems.append(str(e))
  t = config.train
  gb, micro = int(t.global_batch_size), int(t.micro_batches)
  if micro < 1:
    problems.append(f"train.micro_batches must be >= 1, got {micro}")
  elif gb % micro:
    problems.append(f"train.global_batch_size {gb} is not divisible by train.micro_batches {micro}")
  elif shape is not None:
    shards = shape[0] * shape[1]
    if (gb // micro) % shards:
      problems.append(f"the micro batch {gb // micro} (train.global_batch_size {gb} / "
                      f"micro_batches {micro}) is not divisible by the {shards} batch shards of "
                      f"mesh data x fsdp = {shape[0]} x {shape[1]}")
  if gb % process_count:
    problems.append(f"train.global_batch_size {gb} is not divisible by {process_count} processes")
  for name in ("num_steps", "log_every"):
    if int(t[name]) < 1:
      problems.append(f"train.{name} must be >= 1, got {t[name]}")
  if int(t.profile_steps) < 0 or (int(t.profile_steps) and int(t.profile_start) < 1):
    problems.append(f"train.profile_steps must be >= 0 and train.profile_start >= 1 (step 1 "
                    f"compiles), got {t.profile_steps} and {t.profile_start}")
  if int(t.checkpoint_every) < 0:
    problems.append(f"train.checkpoint_every must be >= 0 (0: never), got {t.checkpoint_every}")
  problems += _range_problems(config)
  if t.lr_schedule not in state_lib.LR_SCHEDULES:
    problems.append(f"train.lr_schedule {t.lr_schedule!r} is not one of {state_lib.LR_SCHEDULES}")
  if t.chip != "auto" and t.chip not in chip_specs.PEAK_TFLOPS:
    problems.append(f"train.chip {t.chip!r} is not one of "
                    f"{['auto'] + sorted(chip_specs.PEAK_TFLOPS)}")
  problems += _init_from_problems(t, workdir)
  problems += task.config_problems(config, process_count)
  if problems:
    raise ConfigError("; ".join(p.replace("\n", " ") for p in problems))
  return shape


class _StopFlag:
  """SIGTERM / SIGINT set a flag; the loop saves at the next step boundary and returns."""

  def __init__(self):
    self.signal = None
    self.settled = False
    self._old = {}

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return  # signal handlers can only be set from the main thread
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame) -> None:
    del frame
    if self.settled:  # the stop's checkpoint is written: nothing left to hurry
      return
    if self.signal is not None:  # a second signal: the user does not want to wait for the save
      raise KeyboardInterrupt(f"second signal {signal.Signals(signum).name}")
    self.signal = signal.Signals(signum).name  # no logging here: handlers interrupt anything

  def settle(self) -> None:
    """The run stopped for a signal (its own or another process's) and its checkpoint is
    written. A preemption notice that reaches this process now (repeated, or sent to every host
    a moment apart) must not kill it on its way out: another process waits for it to leave the
    distributed runtime, and its exit status says the stop went well. So signals are ignored
    from here, and SIGTERM stays ignored after `uninstall`."""
    self.settled = True

  def uninstall(self) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, signal.SIG_IGN if self.settled and sig == signal.SIGTERM else old)
    self._old = {}


class _Agreement:
  """One number all processes agree on: the max of every process's value, by an all-reduce over
  the mesh's devices (JAX's own collectives; the processes issue it in the same order). On one
  process it is the value itself, with no device work."""

  def __init__(self, mesh):
    self.multi = jax.process_count() > 1
    if self.multi:
      self._sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
      self._local = len(mesh.local_devices)
      self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))
      self._sum = jax.jit(lambda x: jnp.sum(x, axis=0), out_shardings=NamedSharding(mesh, PartitionSpec()))

  def dispatch(self, value: int):
    """Starts the reduction of this process's `value`; `read` gives the result."""
    if not self.multi:
      return int(value)
    local = np.full((self._local,), int(value), np.int32)
    return self._max(jax.make_array_from_process_local_data(self._sharding, local))

  @staticmethod
  def read(handle) -> int:
    if isinstance(handle, jax.Array):
      return int(np.asarray(handle.addressable_data(0)))
    return int(handle)

  def max(self, value: int) -> int:
    """The max over all processes (blocks until every process has given its value)."""
    return self.read(self.dispatch(value))

  def sums(self, values) -> list[int]:
    """Each of `values` summed over all processes, in one all-reduce (each process gives its
    values on one of its devices, zeros on the rest)."""
    values = [int(v) for v in values]
    if not self.multi or not values:
      return values
    local = np.zeros((self._local, len(values)), np.int32)
    local[0] = values
    total = self._sum(jax.make_array_from_process_local_data(self._sharding, local))
    return [int(v) for v in np.asarray(total.addressable_data(0))]


# The loader's counts (its `stats`) that every metrics row carries, summed over the processes:
# each reads its own rows, so process 0's count alone would be a share.
LOADER_COUNTS = ("bad_records", "truncated_captions")


def _loader_counts(data_iter, agreement: _Agreement) -> dict[str, int]:
  """What the loader replaced or cut so far, run-wide (exact: the counts are in its state and
  survive a resume). Every process calls it at the same rows (one collective)."""
  stats = getattr(data_iter, "stats", None)
  if not isinstance(stats, dict):
    return {}
  keys = [k for k in LOADER_COUNTS if k in stats]
  return dict(zip(keys, agreement.sums(stats[k] for k in keys)))


class _StopAgreement:
  """Whether every process stops after this step: each step boundary reduces the processes' stop
  flags (`_Agreement`, dispatched behind the step) and decides on the reduction of the previous
  boundary, which is the same number on every process. So a signal on any process stops all of
  them at the same step, one or two boundaries later, and the host never waits for more than the
  step before the one in flight. One process decides on its own flag at once."""

  def __init__(self, flag: _StopFlag, agreement: _Agreement):
    self._flag, self._agreement = flag, agreement
    self._pending = None

  def stop_after_this_step(self) -> bool:
    local = self._flag.signal is not None
    if not self._agreement.multi:
      return local
    handle = self._agreement.dispatch(local)
    previous, self._pending = self._pending, handle
    return previous is not None and self._agreement.read(previous) > 0


def _check_finite(step: int, host: dict, ckpt) -> None:
  for key in ("loss", "grad_norm"):
    value = float(host[key])
    if not math.isfinite(value):
      ckpt.wait()
      last = ckpt.latest_step()
      where = (f"the last good checkpoint is step {last} in {ckpt.directory}" if last is not None
               else "no checkpoint was written")
      raise TrainingDiverged(f"{key} is {value} at step {step}: training stopped without saving "
                             f"this state; {where}")


_OK, _DAMAGED, _INCOMPATIBLE, _NO_MEMORY = 0, 1, 2, 3


def _read_verdict(error: Exception) -> tuple[int, str]:
  """(verdict, one-line reason) of a failed checkpoint read: another run's layout is
  incompatible (reading again is futile), lack of memory says nothing against the files, any
  other failure may be damage or a passing filesystem error."""
  if isinstance(error, ckpt_lib.IncompatibleCheckpoint):
    return _INCOMPATIBLE, str(error).replace("\n", " ")
  return (_NO_MEMORY if out_of_memory_line(error) else _DAMAGED), first_line(error)


def _restore_attempt(ckpt, step: int, setup, data_iter) -> tuple[int, str, Any]:
  """(verdict, reason, state) of one try at restoring `step` on this process."""
  problems = ckpt.problems(step)
  if problems:
    return _DAMAGED, "; ".join(problems), None
  try:
    state, _ = ckpt.restore(step, setup.abstract_state, data_iter)
  except Exception as e:  # noqa: BLE001  (any failure to read the step: see _resume)
    return (*_read_verdict(e), None)
  return _OK, "", state


def _close_iterator(data_iter) -> None:
  """Stops a loader iterator's reader threads and worker processes."""
  close = getattr(data_iter, "close", None)
  if close is not None:
    close()


def _fresh_iterator(data_iter, setup):
  """A new loader iterator in place of one that a failed restore may have moved."""
  _close_iterator(data_iter)
  return setup.make_data_iterator()


def _timed(stall: stall_watch.StallWatch, what: str, agree):
  """`agree` with the watch armed for `what` while it waits for the other hosts; not armed
  `after_compiles`, when the others may still be compiling (as in `_compile_step`)."""

  def call(value: int, after_compiles: bool = False) -> int:
    if not after_compiles:
      stall.expect(what)
    try:
      return agree(value)
    finally:
      stall.pause()
  return call


def _compile_step(setup, state, batch, rng, first: bool, agreement: _Agreement,
                  stall: stall_watch.StallWatch):
  """The step compiled for `batch`'s shapes (with the first batch, the evaluation's programs
  too), once every host has compiled it. Neither the compile nor the wait for the slowest host's
  is timed: a compile's length cannot be foretold, and a run timed from the end of this host's
  compile would also time the others' (a host whose compilation cache missed compiles for
  minutes longer). So the first run after it, and the first evaluation, wait for no compile. In
  mid-run, the steps in flight end first, while the watch still times them."""
  if not first:
    jax.block_until_ready(state)
  stall.pause()
  what = "the train step" + (" and the evaluation's programs, if any," if first else "")
  logging.info("compiling %s for the batch shapes %s", what,
               [tuple(x.shape) for x in jax.tree.leaves(batch)])
  started = time.perf_counter()
  run_step = setup.compile_step(state, batch, rng)
  if first:
    setup.compile_eval(state)
  logging.info("compiled %s in %.1f s%s", what, time.perf_counter() - started,
               "; waiting for every host's compile" if agreement.multi else "")
  agreement.max(0)
  return run_step


def _resume(ckpt, setup, agreement: _Agreement, logger, stall: stall_watch.StallWatch):
  """(state, step, data iterator) of the newest checkpoint that restores on every process;
  (None, None, fresh iterator) when the workdir has none. A step that fails anywhere (a
  missing or unreadable file, an error of the restore) is read once more on every process (a
  network filesystem's error may pass), then moved aside on process 0 and the next older one is
  tried. ResumeError, with the checkpoint left in place, when it belongs to another run (a state
  of another model or optimizer, told from its metadata before any array is read; a loader
  state of another pipeline) or a process ran out of memory restoring it; ResumeError too when
  every step failed."""
  stall.expect("starting the loader")
  data_iter = setup.make_data_iterator()
  moved: list[str] = []
  while ckpt.all_steps():
    step = max(ckpt.all_steps())
    for attempt in range(2):
      stall.expect(f"restoring checkpoint {step} (its files and every host's agreement)")
      verdict, reason, state = _restore_attempt(ckpt, step, setup, data_iter)
      agreed = agreement.max(verdict)
      if agreed != _DAMAGED or attempt:
        break
      logging.warning("checkpoint %s failed to restore (%s); reading it once more",
                      ckpt.step_dir(step), reason or "on another process")
      logger.event(step, event="restore_retry", reason=reason or "another process failed")
      state = None  # a process that did restore frees it before reading again
      data_iter = _fresh_iterator(data_iter, setup)
    if agreed == _OK:
      return state, step, data_iter
    if agreed == _INCOMPATIBLE:
      raise ResumeError(f"{reason or 'another process cannot resume this checkpoint'}; the "
                        f"checkpoint {ckpt.step_dir(step)} is intact and was left in place: "
                        "resume it with the config that wrote it (saved in its config/ folder), "
                        "train in another --workdir, or start one from its params with "
                        f"train.init_from={os.path.dirname(ckpt.directory)}")
    if agreed == _NO_MEMORY:
      raise ResumeError(f"restoring {ckpt.step_dir(step)} ran out of memory ("
                        f"{reason or 'on another process'}); the checkpoint is left in place: "
                        "free host or device memory, or resume on more devices")
    state = None
    agreement.max(0)  # every process is done with the folder before it moves
    target = ckpt.move_aside(step) if jax.process_index() == 0 else "damaged_checkpoints/"
    agreement.max(0)
    ckpt.reload()
    moved.append(target)
    older = ckpt.all_steps()
    logging.error("checkpoint %s cannot be restored (%s): moved to %s; %s", ckpt.step_dir(step),
                  reason or "another process could not read it", target,
                  f"restoring step {max(older)}" if older else "no older step")
    logger.event(step, event="damaged_checkpoint", reason=reason, moved_to=target)
    data_iter = _fresh_iterator(data_iter, setup)
  if moved:
    raise ResumeError(f"no intact checkpoint in {ckpt.directory}: the damaged steps were moved to "
                      f"{', '.join(moved)}; rerun to start from step 0, or repair them")
  return None, None, data_iter


def _naming(source: str, error: BaseException | str) -> str:
  """`error`'s message on one line, starting with `train.init_from` (and the source)."""
  text = " ".join(str(error).split())
  return text if text.startswith("train.init_from") else f"train.init_from {source}: {text}"


def _init_from(t, setup, agreement: _Agreement, stall: stall_watch.StallWatch):
  """(params, step read or None for a weights file) of `train.init_from` (its step
  `train.init_from_step`, -1 the newest; a file in `train.init_from_format`), read by every
  process and agreed on: a read that fails anywhere is tried once more on every process (a
  network filesystem's error may pass), then every process raises the same one-line error:
  ConfigError (no checkpoint there, one of another model, or one that cannot be read) or
  OutOfMemory."""
  source, fmt = t.init_from, t.init_from_format
  step = None if int(t.init_from_step) < 0 else int(t.init_from_step)
  stall.expect(f"reading train.init_from {source}")
  for attempt in range(2):
    loaded, reason = None, ""
    try:
      loaded, verdict = setup.load_init_params(source, fmt, step), _OK
    except FileNotFoundError as e:  # no finished checkpoint (yet: a listing may be stale)
      verdict, reason = _DAMAGED, _naming(source, e)
    except InputError as e:  # weights that do not fit the model, a file of another format
      verdict, reason = _INCOMPATIBLE, _naming(source, e)
    except Exception as e:  # noqa: BLE001  (any other failure to read it)
      verdict, reason = _read_verdict(e)
      if verdict == _INCOMPATIBLE:
        reason = _naming(source, reason)
      else:
        what = "its checkpoint" if not fmt else f"its {fmt} weights"
        reason = f"train.init_from {source}: {what} cannot be read ({reason})"
    agreed = agreement.max(verdict)
    if agreed == _OK:
      stall.pause()  # what follows (the optimizer state's compile and init) is local work
      return loaded
    if agreed != _DAMAGED or attempt:
      break
    logging.warning("train.init_from %s failed to load (%s); reading it once more", source,
                    reason or "on another process")
  if agreed == _NO_MEMORY:
    raise OutOfMemory(f"loading train.init_from {source} ({reason or 'on another process'}); no "
                      "step was run: free host or device memory, or start on more devices")
  raise ConfigError(reason or f"train.init_from {source} cannot be loaded on another process")


_MISSING = object()
_CHANGES_SHOWN, _VALUE_CHARS = 12, 40  # in the resume's one line


def config_changes(saved: dict, current: dict) -> list[str]:
  """`field old -> new` for every config field whose value differs between the config a
  checkpoint saved and this run's (`absent` where one has no such field), by field name."""
  old, new = ckpt_lib.flat_config(saved), ckpt_lib.flat_config(current)

  def shown(value) -> str:
    text = "absent" if value is _MISSING else repr(tuple(value) if isinstance(value, list)
                                                   else value)
    return text if len(text) <= _VALUE_CHARS else text[:_VALUE_CHARS - 3] + "..."

  return [f"{k} {shown(old.get(k, _MISSING))} -> {shown(new.get(k, _MISSING))}"
          for k in sorted(set(old) | set(new)) if old.get(k, _MISSING) != new.get(k, _MISSING)]


def _log_resume(ckpt, step: int, config_json: dict, t, workdir: str) -> None:
  """What a resume keeps from the command: one line for the config fields that differ from the
  checkpoint's saved config (those a checkpoint refuses never get here: ResumeError), one for an
  ignored `train.init_from`, one when nothing is left to train."""
  if t.init_from:
    logging.info("train.init_from %s ignored: resuming %s at step %d", t.init_from, workdir, step)
  else:
    logging.info("resumed from %s step %d", ckpt.directory, step)
  try:
    saved = ckpt.read_config(step)
  except Exception as e:  # noqa: BLE001  (restored without it: only the note is lost)
    logging.warning("the config saved with step %d cannot be read (%s): not compared with this "
                    "run's", step, first_line(e))
    saved = None
  if isinstance(saved, dict):
    changes = config_changes(saved, config_json)
    if changes:
      rest = len(changes) - _CHANGES_SHOWN
      logging.warning("resuming step %d with %d config field%s changed since it was saved: %s%s",
                      step, len(changes), "s" if len(changes) > 1 else "",
                      "; ".join(changes[:_CHANGES_SHOWN]), f"; {rest} more" if rest > 0 else "")
  if step >= int(t.num_steps):
    logging.warning("the run is already at step %d >= train.num_steps %d: nothing to train "
                    "(raise train.num_steps to go on)", step, int(t.num_steps))


# ----------------------------------------------------------------------------- the loop


def train(config, workdir: str, task: Task) -> dict[str, Any]:
  """Trains `config` as `task` in `workdir` (resuming from its newest intact checkpoint) and
  returns a summary: {"step", "stopped_by" (signal name, "another process" or None),
  "resumed_from" (step or None), "last_record"}."""
  heartbeat = int(config.train.heartbeat_timeout_s)
  if heartbeat < 1:
    raise ConfigError(f"train.heartbeat_timeout_s must be >= 1, got {heartbeat}")
  init_timeout = int(config.train.distributed_init_timeout_s)
  if init_timeout < 1:
    raise ConfigError(f"train.distributed_init_timeout_s must be >= 1, got {init_timeout}")
  multihost.initialize_distributed(heartbeat, init_timeout)
  workdir = os.path.abspath(workdir)
  mesh_shape = validate_config(config, task, workdir=workdir)
  # Before the first step: not after training up to the first checkpoint.
  writable_folders.check_writable_folder(workdir, "the workdir")
  writable_folders.check_writable_folder(ckpt_lib.checkpoint_dir(workdir), "the checkpoint folder")
  host_consistency.check(config, workdir, init_timeout)  # before any collective that would hang
  is_main = jax.process_index() == 0
  t = config.train
  num_steps, log_every, ckpt_every = int(t.num_steps), int(t.log_every), int(t.checkpoint_every)

  mesh = parallel.make_mesh(dict(config.mesh))
  logging.info("mesh %s over %d devices (%s)", dict(zip(parallel.MESH_AXES, mesh_shape)),
               jax.device_count(), jax.devices()[0].device_kind)
  agreement = _Agreement(mesh)
  stall = stall_watch.StallWatch(  # its event goes where the logger's go: process 0's file
      float(t.stall_timeout_s), ckpt_lib.checkpoint_dir(workdir),
      events_path=metrics_lib.metrics_path(workdir) if is_main else None)
  # The first collective across processes makes the CPU collectives' (Gloo's) context, whose
  # key exchange gives up after 30 s: now, while the hosts are in step, not after a compile that
  # one host ends minutes after the other (a fresh run's first collective came after it).
  _timed(stall, "the first collective with every host", agreement.max)(0)
  resolved = None  # the task's choices made on the mesh (the DiT's remat "auto"): a metrics event
  if task.resolve_config is not None:
    config, resolved = task.resolve_config(
        config, mesh, workdir, _timed(stall, "agreeing on the config's choices with every host",
                                      agreement.max))
  setup = task.make_setup(config, mesh)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=int(t.keep_checkpoints),
                               async_save=bool(t.async_checkpointing))
  logger = setup.logger_class(workdir, num_steps=num_steps, num_devices=jax.device_count(),
                              chip=t.chip, is_main=is_main)
  config_json = {**ckpt_lib.config_to_json(config), **setup.saved_facts}
  stop = _StopFlag()
  profile = profiling.ProfileWindow(workdir, start=int(t.profile_start),
                                    steps=int(t.profile_steps))
  uncommitted: list[int] = []

  def log_committed(force: bool = False) -> None:
    """The "checkpoint" events of the saves that have committed (all of them with `force`)."""
    if uncommitted and (force or not ckpt.saving()):
      for s in uncommitted:
        logger.event(s, event="checkpoint")
      uncommitted.clear()

  def evaluate(step: int, state) -> None:
    result = setup.evaluate(state, step)
    logger.event(step, event="eval", **result)
    logging.info("step %d eval: %s", step, result)

  resumed_from = None
  stopped_by = None
  data_iter = None
  step = None
  try:
    with parallel.mesh_context(mesh, setup.rules):
      state, resumed_from, data_iter = _resume(ckpt, setup, agreement, logger, stall)
    # Off the mesh context: a weights reader's host work (a model's boxed abstract params) must
    # not be constrained to the run's mesh; the params are placed on explicit shardings.
    loaded = (_init_from(t, setup, agreement, stall)
              if resumed_from is None and t.init_from else None)
    with parallel.mesh_context(mesh, setup.rules):
      if resumed_from is not None:
        _log_resume(ckpt, resumed_from, config_json, t, workdir)
        logger.event(resumed_from, event="resume", num_steps=num_steps,
                     **({"init_from_ignored": t.init_from} if t.init_from else {}))
      elif loaded is not None:
        params, source_step = loaded
        state = setup.state_from_params(params)
        del params, loaded
        what = (f"the params of step {source_step} of {t.init_from}" if source_step is not None
                else f"the {t.init_from_format} weights {t.init_from}")
        logging.info("train.init_from: loaded %s; the optimizer state starts fresh, %s", what,
                     setup.init_from_note)
        logger.event(0, event="init_from", num_steps=num_steps, source=t.init_from,
                     **({"source_step": source_step} if source_step is not None
                        else {"format": t.init_from_format}))
      else:
        stall.pause()  # the init's compile and run: local work
        state = setup.init_state(int(config.seed))
        logger.event(0, event="start", num_steps=num_steps)
      if resolved is not None:
        logger.event(resumed_from or 0, **resolved)
      if is_main:
        logging.info("parameters:\n%s", parameter_overview.get_parameter_overview(
            state.params, include_stats=False))
      step = int(jax.device_get(state.step))
      if step != (resumed_from or 0):
        raise RuntimeError(f"checkpoint {resumed_from} holds state.step {step}")
      stall.step = step
      base_rng = jax.random.PRNGKey(int(config.seed))
      last_saved = resumed_from
      pending: list[tuple[int, Any, int, int, float]] = []
      last_record = None
      stop.install()
      stopping = _StopAgreement(stop, agreement)
      first = True
      untimed_through = 0  # steps run before the clock restarted: counted in no throughput
      steps_by_shape: dict[tuple, Any] = {}  # the step compiled for each batch shape (and dtype)
      stall.expect("reading the first batch")
      while step < num_steps and stopped_by is None:
        try:
          local = next(data_iter)
        except Exception as e:  # noqa: BLE001  (only a data error is translated)
          bad = input_errors.found_in(e)
          if bad is None:
            raise
          kept = (f"the checkpoints up to step {last_saved} are intact" if last_saved else
                  "no checkpoint was written")
          raise DataError(f"reading the batch of step {step + 1}: {bad}; {kept}: fix the data "
                          "and rerun the same command to resume") from e
        if step + 1 == int(t.debug_nan_step):
          local = setup.poison(local)
        counts = setup.batch_counts(local)
        batch = setup.device_batch(local)
        rng = jax.random.fold_in(base_rng, step)
        shapes = tuple((x.shape, x.dtype) for x in jax.tree.leaves(batch))
        run_step = steps_by_shape.get(shapes)
        if run_step is None:  # the first batch, or a bucket's shapes first met in mid-run
          run_step = steps_by_shape[shapes] = _compile_step(setup, state, batch, rng, first,
                                                            agreement, stall)
        profile.before_step(step, state)
        with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
          state, m = run_step(state, batch, rng)
        step += 1
        profiled = profile.after_step(step, state)
        if profiled:
          logger.event(step, event="profile", **profiled)
        pending.append((step, m, *counts))
        if first:  # exclude compilation from the throughput numbers
          stall.expect(f"running step {step} (after its compile)")
          jax.block_until_ready(m)
          logger.restart_clock()
          untimed_through = step
          first = False
        stall.beat(step)
        if stopping.stop_after_this_step():  # the same answer on every process
          stopped_by = stop.signal or "another process"
        at_end = step == num_steps or stopped_by is not None
        save_now = ckpt_every > 0 and (step % ckpt_every == 0 or at_end)
        # The evaluation after the last step: not at a stop, which saves and exits at once.
        eval_now = setup.eval_due(step, step == num_steps)
        if step % log_every == 0 or save_now or eval_now or at_end:
          for s, pm, images, tokens, flops in pending:
            host = jax.device_get(pm)
            try:
              _check_finite(s, host, ckpt)
            except TrainingDiverged as e:
              log_committed(force=True)  # _check_finite waited for the saves
              logger.event(s, event="diverged", reason=str(e))
              raise
            logger.add(host, images=images, tokens=tokens, flops=flops,
                       timed=s > untimed_through)
            if s % log_every == 0 or (at_end and s == step):
              last_record = logger.write(s, _loader_counts(data_iter, agreement))
          pending = []
          log_committed()
        # After the finiteness check of this step's metrics; at a stop, after the save has
        # started, so that the evaluation does not spend the grace time before it.
        if eval_now and stopped_by is None:
          evaluate(step, state)
        if save_now and last_saved != step:
          ckpt.save(step, state, data_iter, config_json)
          log_committed(force=True)  # save() waited for the earlier saves: they have committed
          last_saved = step
          uncommitted.append(step)
        if eval_now and stopped_by is not None:
          evaluate(step, state)
      profiled = profile.stop(state, step)  # a window the run's end cut short
      if profiled:
        logger.event(step, event="profile", **profiled)
      stall.expect("committing the last checkpoint saves")
      ckpt.wait()
      log_committed(force=True)
      if stopped_by is not None:
        stop.settle()
        logging.warning("%s: %s and stopping",
                        f"{stopped_by} received" if stop.signal else "a signal on another process",
                        f"saved step {step} to {ckpt.directory}" if ckpt_every else
                        "nothing saved (train.checkpoint_every = 0)")
        logger.event(step, event="stopped", signal=stopped_by)
      if step >= num_steps:  # the last line of a run that is done (a dead one has none)
        logger.event(step, event="finished")
      return {"step": step, "stopped_by": stopped_by, "resumed_from": resumed_from,
              "last_record": last_record}
  except ckpt_lib.SaveFailed as e:
    raise CheckpointError(f"{e}: make the checkpoint folder writable (space, permissions) and "
                          "rerun the same command to resume from there") from e
  except Exception as e:  # noqa: BLE001  (only a failure for lack of memory is translated)
    line = out_of_memory_line(e)
    if line is None or isinstance(e, (ConfigError, TrainingDiverged, ResumeError,
                                  OutOfMemory)):
      raise
    where = "before the first step" if step is None else f"after step {step}"
    raise OutOfMemory(
        f"{where}: {line}; the checkpoints in {ckpt.directory} are intact. Make the step fit: "
        "a smaller batch per device (train.global_batch_size, train.micro_batches), more "
        "rematerialization (the DiT's model.remat_policy; \"auto\" picks what fits) or more "
        "devices") from e
  finally:
    stall.stop()
    profile.abort()
    _close_iterator(data_iter)  # its worker processes, before anything else can fail
    try:
      ckpt.close()
    except ckpt_lib.SaveFailed as e:  # only after another error: a finished run has waited
      logging.error("%s", e)
    logger.close()
    stop.uninstall()
