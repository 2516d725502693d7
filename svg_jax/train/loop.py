"""The training loop of every task: `train(config, workdir)`.

`config.task` picks a task setup: "dit" (`DiTSetup` below) or "decoder"
(svg_jax/train/decoder_task.py). A setup is what differs between tasks; the loop (resume, signals,
NaN stop, checkpoints, metrics) is shared. A setup provides:
  rules, abstract_state (ShapeDtypeStructs with shardings), state_shardings,
  init_state(seed), state_from_params(params)  (jitted, sharded; params = the trained model),
  step(state, batch, rng) -> (state, metrics)   (jitted; metrics hold at least loss, grad_norm),
  make_data_iterator()  (a Grain iterator whose state goes into checkpoints),
  device_batch(local), batch_counts(local) -> (images, tokens, flops), poison(local) (NaN batch),
  logger_class (a MetricsLogger), eval_due(step, at_end), evaluate(state, step) -> dict
  (written to metrics.jsonl as an "eval" record).

Order of work (nothing compiles before the config has been checked):
  1. `validate_config`: one `ConfigError` line listing every problem (mesh vs devices, batch vs
     data axes and micro-batches, data path / manifest vs model dims, schedule names, ...).
  2. Mesh; abstract state with `jax.eval_shape` (params keep their logical axis names, so the
     optimizer moments and EMA inherit the parameter shardings); a jitted init with out_shardings
     materializes every array directly in its shards.
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
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import parameter_overview

from svg_jax import autoencoder as ae_lib
from svg_jax import config as config_lib
from svg_jax import flow, parallel
from svg_jax.data import pipeline as pipeline_lib
from svg_jax.data import records
from svg_jax.models.nextdit import NextDiT
from svg_jax.train import checkpoint as ckpt_lib
from svg_jax.train import dit_step
from svg_jax.train import metrics as metrics_lib
from svg_jax.train import state as state_lib

EMPTY_TEXT_FILE = "empty_text.npy"
TASKS = ("dit", "decoder")


class ConfigError(ValueError):
  """The config cannot run; the message is one line naming every problem."""


class TrainingDiverged(RuntimeError):
  """A non-finite loss or gradient norm; the bad state was not saved."""


# ----------------------------------------------------------------------------- validation


def _manifest_or_none(path: str):
  try:
    return records.read_manifest(path)
  except Exception:  # reported by validate_config as one line
    return None


def validate_config(config, num_devices: int | None = None,
                    process_count: int | None = None) -> tuple[int, ...]:
  """Checks everything that can be checked without compiling; returns the mesh shape."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  problems: list[str] = []
  if config.task not in TASKS:
    problems.append(f"task {config.task!r} is not supported by this trainer (only {TASKS})")
  shape = None
  try:
    shape = parallel.mesh_shape(dict(config.mesh), num_devices)
  except ValueError as e:
    problems.append(str(e))
  if config.task == "dit":
    try:
      model_cfg = config_lib.nextdit_config(config)
    except ValueError as e:
      problems.append(str(e))
      model_cfg = None
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
  if config.task == "dit":
    problems += _dit_problems(config, model_cfg, gb, process_count)
  if t.chip != "auto" and t.chip not in metrics_lib.PEAK_TFLOPS:
    problems.append(f"train.chip {t.chip!r} is not one of "
                    f"{['auto'] + sorted(metrics_lib.PEAK_TFLOPS)}")
  if t.init_from and not os.path.isdir(t.init_from):
    problems.append(f"train.init_from {t.init_from!r} does not exist")
  if config.task == "decoder":
    from svg_jax.train import decoder_task  # the decoder task imports this module
    problems += decoder_task.config_problems(config)
  if problems:
    raise ConfigError("; ".join(p.replace("\n", " ") for p in problems))
  return shape


def bottleneck_problems(model_cfg) -> list[str]:
  """A DiT narrower than its patch cannot learn the flow: the velocity x1 - x0 holds the noise in
  every input dimension, but x_embedder keeps only `dim` of them, so the loss has a floor of about
  (1 - dim / patch_dim) and samples keep undenoised noise in the lost directions (measured on the
  demo: dim 192 over 384-channel latents plateaued at loss 0.65 even on 8 memorized images)."""
  patch_dim = model_cfg.in_channels * model_cfg.patch_size ** 2
  if model_cfg.dim >= patch_dim:
    return []
  return [f"model.dim {model_cfg.dim} is below the patch's {patch_dim} input dimensions "
          f"(in_channels {model_cfg.in_channels} x patch_size^2 {model_cfg.patch_size ** 2}): the "
          "x_embedder would drop noise directions that the velocity target keeps, a loss floor no "
          "training removes; use model.dim >= in_channels x patch_size^2"]


def _dit_problems(config, model_cfg, gb: int, process_count: int) -> list[str]:
  """The checks only the DiT task needs (flow, caption dropout, EMA, the record dataset)."""
  problems: list[str] = []
  t = config.train
  if config.flow.timestep_sampling not in flow.TIMESTEP_KINDS:
    problems.append(f"flow.timestep_sampling {config.flow.timestep_sampling!r} is not one of "
                    f"{flow.TIMESTEP_KINDS}")
  if not 0.0 <= float(t.caption_dropout) <= 1.0:
    problems.append(f"train.caption_dropout must be in [0, 1], got {t.caption_dropout}")
  if not 0.0 <= float(t.ema_decay) <= 1.0:
    problems.append(f"train.ema_decay must be in [0, 1], got {t.ema_decay}")
  if model_cfg is not None:
    problems += bottleneck_problems(model_cfg)
  path = config.data.path
  if not path:
    problems.append("data.path is empty (a folder with manifest.json and ArrayRecord shards)")
  elif not os.path.isdir(path):
    problems.append(f"data.path {path!r} does not exist")
  else:
    manifest = _manifest_or_none(path)
    if manifest is None:
      problems.append(f"data.path {path!r} has no readable {records.MANIFEST_NAME}")
    elif model_cfg is not None:
      kind = manifest["text"]["kind"]
      if kind == "token_ids":  # online mode: the trainer runs the frozen text encoder
        problems += _online_text_problems(config, model_cfg)
      elif kind != "text_features":
        problems.append(f"data.path {path!r} holds {kind}; the DiT trainer needs text_features "
                        "or token_ids")
      elif manifest["text"].get("dim") != model_cfg.cap_feat_dim:
        problems.append(f"the dataset's text features have dim {manifest['text'].get('dim')} but "
                        f"model.cap_feat_dim is {model_cfg.cap_feat_dim}")
      if manifest["latent_channels"] != model_cfg.in_channels:
        problems.append(f"the dataset's latents have {manifest['latent_channels']} channels but "
                        f"model.in_channels is {model_cfg.in_channels}")
      try:
        empty = load_empty_text(config, log_substitute=False)
        if kind == "token_ids":
          pass  # token ids of the empty prompt; their features come from the text encoder
        elif empty.shape[1] != model_cfg.cap_feat_dim:
          problems.append(f"data.empty_text has dim {empty.shape[1]}, model.cap_feat_dim is "
                          f"{model_cfg.cap_feat_dim}")
        if empty.shape[0] > min(config.data.caption_len_buckets or (config.data.max_caption_len,)):
          problems.append(f"data.empty_text has {empty.shape[0]} tokens, more than the shortest "
                          "caption length bucket")
      except (OSError, ValueError) as e:
        problems.append(str(e))
  try:
    _pipeline_config(config, max(gb // max(process_count, 1), 1)).validate()
  except ValueError as e:
    problems.append(f"data: {e}")
  return problems


def _online_text_problems(config, model_cfg) -> list[str]:
  if not config.text.encoder_dir:
    return [f"data.path {config.data.path!r} holds token ids: set text.encoder_dir to the local "
            "Gemma-2 folder the trainer runs on them (online mode)"]
  from svg_jax.convert.gemma2 import config_from_hf_json
  try:
    text_cfg = config_from_hf_json(config.text.encoder_dir,
                                   hidden_layer=int(config.text.hidden_layer))
  except (OSError, ValueError) as e:
    return [f"text.encoder_dir: {e}"]
  if text_cfg.hidden_size != model_cfg.cap_feat_dim:
    return [f"the text encoder's hidden size {text_cfg.hidden_size} != model.cap_feat_dim "
            f"{model_cfg.cap_feat_dim}"]
  return []


def load_text_encoder(config, mesh):
  """Online mode: (Gemma2Encoder, params placed on `mesh` by their logical axes, shardings)."""
  from svg_jax.convert.gemma2 import config_from_hf_json, load_gemma2
  from svg_jax.models.gemma2 import Gemma2Encoder

  cfg = config_from_hf_json(config.text.encoder_dir, hidden_layer=int(config.text.hidden_layer))
  model = Gemma2Encoder(cfg)
  ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  boxed = jax.eval_shape(lambda i: model.init(jax.random.PRNGKey(0), i, jnp.ones((1, 8), bool)),
                         ids)["params"]
  shardings = parallel.logical_shardings(boxed, mesh, config.axis_rules)
  params = jax.device_put(load_gemma2(config.text.encoder_dir, cfg, only_needed=True), shardings)
  return model, params, shardings


# ----------------------------------------------------------------------------- building blocks


def stand_in_empty_text(dim: int) -> np.ndarray:
  """One fixed token of unit RMS [1, dim]. Not zeros: a valid all-zero caption token leaves the
  caption stream at the embedder's bias, whose RMSNorm gradient grows as 1 / rms; on the 2.6B
  model a batch with a dropped caption had a gradient norm of 2e7 against 0.1 on the others."""
  token = np.random.default_rng(0).standard_normal((1, dim))
  return (token / np.sqrt(np.mean(token ** 2))).astype(np.float32)


def load_empty_text(config, *, log_substitute: bool = True) -> np.ndarray:
  """The empty-prompt features [Le, D] (see `data.empty_text` in svg_jax/config.py)."""
  spec, dim = config.data.empty_text, int(config.model.cap_feat_dim)
  path = None
  if spec == "auto":
    candidate = os.path.join(config.data.path, EMPTY_TEXT_FILE)
    path = candidate if os.path.exists(candidate) else None
  elif spec != "stand_in":
    path = spec
    if not os.path.exists(path):
      raise ValueError(f"data.empty_text {path!r} does not exist")
  if path is None:
    if log_substitute:
      logging.warning("no %s in %s: the empty prompt is one fixed unit-RMS feature token (a "
                      "stand-in for <bos> features; fine for synthetic data)", EMPTY_TEXT_FILE,
                      config.data.path)
    return stand_in_empty_text(dim)
  arr = np.load(path)
  if np.issubdtype(arr.dtype, np.integer):  # online mode: the empty prompt's token ids [Le]
    return arr.reshape(-1).astype(np.int32)
  arr = arr.astype(np.float32)
  if arr.ndim == 3 and arr.shape[0] == 1:
    arr = arr[0]
  if arr.ndim != 2 or arr.shape[0] < 1:
    raise ValueError(f"data.empty_text {path!r} has shape {arr.shape}; expected [tokens, dim]")
  return arr


def _pipeline_config(config, per_process_batch: int) -> pipeline_lib.PipelineConfig:
  d = config.data
  return pipeline_lib.PipelineConfig(
      per_process_batch_size=per_process_batch, max_caption_len=int(d.max_caption_len),
      caption_len_buckets=tuple(d.caption_len_buckets),
      num_caption_buckets=int(d.num_caption_buckets), seed=int(d.shuffle_seed),
      prefetch_buffer_size=int(d.prefetch), num_threads=int(d.num_threads),
      num_workers=int(d.num_workers))


def make_data_iterator(config):
  """The training iterator of `config`'s task (a Grain iterator that checkpoints its position)."""
  if config.task == "decoder":
    from svg_jax.train import decoder_task
    return decoder_task.make_data_iterator(config)
  per_process = int(config.train.global_batch_size) // jax.process_count()
  expected = ae_lib.config_fingerprints(config.autoencoder)
  return pipeline_lib.make_pipeline(config.data.path, _pipeline_config(config, per_process),
                                    expected_fingerprints=expected)


def Setup(config, mesh):  # noqa: N802 (a factory standing where the DiT setup class stood)
  """The task setup of `config.task` on `mesh` (see the module docstring)."""
  if config.task == "decoder":
    from svg_jax.train import decoder_task
    return decoder_task.DecoderSetup(config, mesh)
  if config.task != "dit":
    raise ConfigError(f"task {config.task!r} is not supported by this trainer (only {TASKS})")
  return DiTSetup(config, mesh)


class DiTSetup:
  """Model, optimizer, abstract state and shardings, jitted init and step for one mesh."""

  logger_class = metrics_lib.MetricsLogger

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    self.rules = config.axis_rules
    self.model_cfg = config_lib.nextdit_config(config)
    self.model = NextDiT(self.model_cfg)
    self.tx = state_lib.make_optimizer(config.train)
    c = self.model_cfg
    dummy = (jnp.zeros((1, 2 * c.patch_size, 2 * c.patch_size, c.in_channels), jnp.float32),
             jnp.zeros((1,), jnp.float32), jnp.zeros((1, 2, c.cap_feat_dim), jnp.float32),
             jnp.ones((1, 2), bool))

    def boxed_state(rng):
      return state_lib.create_state(self.model.init(rng, *dummy)["params"], self.tx)

    boxed = jax.eval_shape(boxed_state, jax.random.PRNGKey(0))
    self.state_shardings, self.abstract_state = state_lib.sharded_abstract_state(
        boxed, mesh, self.rules)
    self._init = jax.jit(lambda rng: state_lib.unbox(boxed_state(rng)),
                         out_shardings=self.state_shardings)
    self._from_params = jax.jit(lambda p: state_lib.create_state(p, self.tx),
                                in_shardings=(self.state_shardings.params,),
                                out_shardings=self.state_shardings)
    self.empty_text = load_empty_text(config)
    manifest = _manifest_or_none(config.data.path) if config.data.path else None
    online = manifest is not None and manifest["text"]["kind"] == "token_ids"
    text_model = None
    repl = parallel.replicated(mesh)
    if online:
      text_model, text_params, text_sh = load_text_encoder(config, mesh)
      text_batch = (("token_ids", 2), ("text_mask", 2), ("text_len", 1))
    else:
      text_batch = (("text", 3), ("text_mask", 2), ("text_len", 1))
    step = dit_step.make_train_step(self.model, self.tx, config, self.empty_text, text_model)
    batch_sh = {k: parallel.batch_sharding(mesh, nd) for k, nd in (("latent", 4),) + text_batch}
    self.batch_keys = tuple(batch_sh)
    if online:  # the frozen text params are an input of every step, never part of the state
      jitted = jax.jit(step, in_shardings=(self.state_shardings, batch_sh, repl, text_sh),
                       out_shardings=(self.state_shardings, repl), donate_argnums=0)
      self.step = lambda state, batch, rng: jitted(state, batch, rng, text_params)
    else:
      self.step = jax.jit(step, in_shardings=(self.state_shardings, batch_sh, repl),
                          out_shardings=(self.state_shardings, repl), donate_argnums=0)

  def init_state(self, seed: int):
    return self._init(jax.random.PRNGKey(seed))

  def state_from_params(self, params):
    return self._from_params(params)

  def device_batch(self, local_batch: dict) -> dict:
    return parallel.global_batch({k: local_batch[k] for k in self.batch_keys}, self.mesh)

  def make_data_iterator(self):
    return make_data_iterator(self.config)

  def batch_counts(self, local_batch: dict) -> tuple[int, int, float]:
    """(images, tokens, FLOPs) of one global step on a batch shaped like `local_batch`."""
    _, h, w = local_batch["latent"].shape[:3]
    cap_len = local_batch["text_mask"].shape[1]
    p = self.model_cfg.patch_size
    gb = int(self.config.train.global_batch_size)
    return (gb, gb * ((h // p) * (w // p) + cap_len),
            metrics_lib.dit_train_flops(self.model_cfg, gb, (h, w), cap_len))

  def poison(self, local_batch: dict) -> dict:
    return dict(local_batch, latent=np.full_like(local_batch["latent"], np.nan))

  def eval_due(self, step: int, at_end: bool) -> bool:
    del step, at_end
    return False  # the DiT task has no in-loop evaluation

  def evaluate(self, state, step: int) -> dict:
    raise NotImplementedError("the DiT task has no in-loop evaluation")


def restore_state(config, workdir: str, mesh, step: int | None = None):
  """The saved state of `workdir` (newest step by default) on `mesh`'s shardings; returns
  (state, step). Restoring onto a mesh other than the one that saved it is supported."""
  setup = Setup(config, mesh)
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


def train(config, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its newest checkpoint) and returns a summary:
  {"step", "stopped_by" (signal name or None), "resumed_from" (step or None), "last_record"}."""
  parallel.initialize_distributed()
  mesh_shape = validate_config(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  t = config.train
  num_steps, log_every, ckpt_every = int(t.num_steps), int(t.log_every), int(t.checkpoint_every)

  mesh = parallel.make_mesh(dict(config.mesh))
  logging.info("mesh %s over %d devices (%s)", dict(zip(parallel.MESH_AXES, mesh_shape)),
               jax.device_count(), jax.devices()[0].device_kind)
  setup = Setup(config, mesh)
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
