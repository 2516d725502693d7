"""The training loop of every task: `train(config, workdir, task)`.

A task (the interface: svg_jax/train/task_api.py; the tasks: dit_task.py, decoder_task.py) brings
what differs: its config checks and its setup (model, state, jitted step, data, logger,
evaluation). The loop brings what is shared: resume, signals, NaN stop, checkpoints, metrics. It
never names a task: svg_jax/train/trainer.py looks `config.task` up and passes the task in.

Order of work (nothing compiles before the config has been checked):
  1. `validate_config`: one `ConfigError` line listing every problem (mesh vs devices, batch vs
     data axes and micro-batches, schedule names, ..., then the task's own: data path / manifest
     vs model dims, ...).
  2. Mesh; the task's setup: abstract state with `jax.eval_shape` (params keep their logical axis
     names, so the optimizer moments and EMA inherit the parameter shardings); a jitted init with
     out_shardings materializes every array directly in its shards.
  3. Auto-resume from the newest checkpoint in `workdir` (state onto this run's shardings, data
     iterator at its saved position); otherwise `train.init_from` params, otherwise a fresh init.
  4. Steps: jit(train_step) with explicit in/out shardings and the state donated. The step rng is
     fold_in(PRNGKey(seed), step), so a resumed run draws what the uninterrupted run drew.
  5. Metrics are fetched lazily (at log and checkpoint steps) so the host does not wait on every
     step; a NaN/inf loss or grad norm stops the run with `TrainingDiverged` *before* the state is
     saved, so the newest checkpoint is always a good one.
  6. Checkpoints every `checkpoint_every` steps, at the end, and at the next step boundary after
     SIGTERM/SIGINT (then `train` returns normally: preemption exits 0).
"""
from __future__ import annotations

import math
import os
import signal
import threading
from typing import Any

import jax
from absl import logging
from clu import parameter_overview

from svg_jax import parallel
from svg_jax.train import checkpoint as ckpt_lib
from svg_jax.train import metrics as metrics_lib
from svg_jax.train import state as state_lib
from svg_jax.train.task_api import Task


class ConfigError(ValueError):
  """The config cannot run; the message is one line naming every problem."""


class TrainingDiverged(RuntimeError):
  """A non-finite loss or gradient norm; the bad state was not saved."""


def validate_config(config, task: Task, num_devices: int | None = None,
                    process_count: int | None = None) -> tuple[int, ...]:
  """Checks everything that can be checked without compiling; returns the mesh shape."""
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
  for name in ("num_steps", "log_every", "checkpoint_every"):
    if int(t[name]) < 1:
      problems.append(f"train.{name} must be >= 1, got {t[name]}")
  if t.lr_schedule not in state_lib.LR_SCHEDULES:
    problems.append(f"train.lr_schedule {t.lr_schedule!r} is not one of {state_lib.LR_SCHEDULES}")
  if t.chip != "auto" and t.chip not in metrics_lib.PEAK_TFLOPS:
    problems.append(f"train.chip {t.chip!r} is not one of "
                    f"{['auto'] + sorted(metrics_lib.PEAK_TFLOPS)}")
  if t.init_from and not os.path.isdir(t.init_from):
    problems.append(f"train.init_from {t.init_from!r} does not exist")
  problems += task.config_problems(config, process_count)
  if problems:
    raise ConfigError("; ".join(p.replace("\n", " ") for p in problems))
  return shape


def restore_state(config, workdir: str, mesh, task: Task, step: int | None = None):
  """The saved state of `workdir` (newest step by default) on `mesh`'s shardings; returns
  (state, step). Restoring onto a mesh other than the one that saved it is supported."""
  setup = task.make_setup(config, mesh)
  ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
    state, _ = ckpt.restore(step, setup.abstract_state)
    return state, step
  finally:
    ckpt.close()


class _StopFlag:
  """SIGTERM / SIGINT set a flag; the loop saves at the next step boundary and returns."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return  # signal handlers can only be set from the main thread
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signal is not None:  # a second signal: the user does not want to wait for the save
      raise KeyboardInterrupt(f"second signal {signal.Signals(signum).name}")
    self.signal = signal.Signals(signum).name  # no logging here: handlers interrupt anything

  def uninstall(self) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}


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


# ----------------------------------------------------------------------------- the loop


def train(config, workdir: str, task: Task) -> dict[str, Any]:
  """Trains `config` as `task` in `workdir` (resuming from its newest checkpoint) and returns a
  summary: {"step", "stopped_by" (signal name or None), "resumed_from" (step or None),
  "last_record"}."""
  parallel.initialize_distributed()
  mesh_shape = validate_config(config, task)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  t = config.train
  num_steps, log_every, ckpt_every = int(t.num_steps), int(t.log_every), int(t.checkpoint_every)

  mesh = parallel.make_mesh(dict(config.mesh))
  logging.info("mesh %s over %d devices (%s)", dict(zip(parallel.MESH_AXES, mesh_shape)),
               jax.device_count(), jax.devices()[0].device_kind)
  setup = task.make_setup(config, mesh)
  data_iter = setup.make_data_iterator()
  ckpt = ckpt_lib.Checkpointer(workdir, keep=int(t.keep_checkpoints),
                               async_save=bool(t.async_checkpointing))
  logger = setup.logger_class(workdir, num_steps=num_steps, num_devices=jax.device_count(),
                              chip=t.chip, is_main=is_main)
  config_json = ckpt_lib.config_to_json(config)
  stop = _StopFlag()
  resumed_from = None
  try:
    with parallel.mesh_context(mesh, setup.rules):
      latest = ckpt.latest_step()
      if latest is not None:
        state, _ = ckpt.restore(latest, setup.abstract_state, data_iter)
        resumed_from = latest
        logging.info("resumed from %s step %d", ckpt.directory, latest)
        logger.event(latest, event="resume")
      elif t.init_from:
        params = ckpt_lib.load_params(t.init_from, setup.abstract_state.params)
        state = setup.state_from_params(params)
        logger.event(0, event="init_from", source=t.init_from)
      else:
        state = setup.init_state(int(config.seed))
        logger.event(0, event="start")
      if is_main:
        logging.info("parameters:\n%s", parameter_overview.get_parameter_overview(
            state.params, include_stats=False))
      step = int(jax.device_get(state.step))
      if step != (resumed_from or 0):
        raise RuntimeError(f"checkpoint {resumed_from} holds state.step {step}")
      base_rng = jax.random.PRNGKey(int(config.seed))
      last_saved = resumed_from
      pending: list[tuple[int, Any, int, int, float]] = []
      last_record = None
      stop.install()
      first = True
      while step < num_steps and stop.signal is None:
        local = next(data_iter)
        if step + 1 == int(t.debug_nan_step):
          local = setup.poison(local)
        counts = setup.batch_counts(local)
        batch = setup.device_batch(local)
        state, m = setup.step(state, batch, jax.random.fold_in(base_rng, step))
        step += 1
        pending.append((step, m, *counts))
        if first:  # exclude compilation from the throughput numbers
          jax.block_until_ready(m)
          logger.restart_clock()
          first = False
        at_end = step == num_steps or stop.signal is not None
        save_now = step % ckpt_every == 0 or at_end
        eval_now = setup.eval_due(step, at_end)
        if step % log_every == 0 or save_now or eval_now:
          for s, pm, images, tokens, flops in pending:
            host = jax.device_get(pm)
            _check_finite(s, host, ckpt)
            logger.add(host, images=images, tokens=tokens, flops=flops)
            if s % log_every == 0 or (at_end and s == step):
              last_record = logger.write(s)
          pending = []
        if eval_now:  # after the finiteness check of this step's metrics
          result = setup.evaluate(state, step)
          logger.event(step, event="eval", **result)
          logging.info("step %d eval: %s", step, result)
        if save_now and last_saved != step:
          ckpt.save(step, state, data_iter, config_json)
          last_saved = step
          logger.event(step, event="checkpoint")
      if stop.signal is not None:
        if last_saved != step:
          for s, pm, *_ in pending:
            _check_finite(s, jax.device_get(pm), ckpt)
          ckpt.save(step, state, data_iter, config_json)
        logging.warning("%s received: saved step %d to %s and stopping", stop.signal, step,
                        ckpt.directory)
        logger.event(step, event="stopped", signal=stop.signal)
      ckpt.wait()
      return {"step": step, "stopped_by": stop.signal, "resumed_from": resumed_from,
              "last_record": last_record}
  finally:
    stop.uninstall()
    ckpt.close()
    logger.close()
