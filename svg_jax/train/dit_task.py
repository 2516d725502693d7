"""The DiT-training task of the shared loop (`task = "dit"`, svg_jax/train/loop.py).

What it adds to the loop: the config checks (flow, caption dropout, EMA, the NextDiT config, the
record dataset against the model's dims), the empty prompt of caption dropout, the record pipeline
(svg_jax/data/pipeline.py), and the setup: NextDiT + AdamW state with shardings from the logical
axis names and the jitted step of svg_jax/train/dit_step.py. When the dataset holds token ids
(online mode) the frozen Gemma-2 runs inside the step; its params are a step input, never state.
Its evaluation (svg_jax/train/validation.py): sample grids of the validation prompts and the
held-out flow loss per noise level, built with the loop's logger (the hook that knows the workdir).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from svg_jax import autoencoder as ae_lib
from svg_jax import checkpoint as ckpt_lib
from svg_jax import config as config_lib
from svg_jax import dit_checkpoint, flow, parallel, precompute
from svg_jax import text as text_lib
from svg_jax.convert import dit_io
from svg_jax.convert.gemma2 import config_from_hf_json, load_gemma2
from svg_jax.data import pipeline as pipeline_lib
from svg_jax.data import records
from svg_jax.models.gemma2 import Gemma2Encoder
from svg_jax.models.nextdit import NextDiT, abstract_params
from svg_jax.train import dit_step, flop_count
from svg_jax.train import state as state_lib
from svg_jax.train import task_api
from svg_jax.train import validation

EMPTY_TEXT_FILE = "empty_text.npy"


def _manifest_or_none(path: str):
  try:
    return records.read_manifest(path)
  except Exception:  # reported by config_problems as one line
    return None


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


def config_problems(config, process_count: int) -> list[str]:
  """The checks only the DiT task needs (model, flow, caption dropout, EMA, the record dataset)."""
  problems: list[str] = []
  try:
    model_cfg = config_lib.nextdit_config(config)
  except ValueError as e:
    problems.append(str(e))
    model_cfg = None
  t = config.train
  gb = int(t.global_batch_size)
  if config.flow.timestep_sampling not in flow.TIMESTEP_KINDS:
    problems.append(f"flow.timestep_sampling {config.flow.timestep_sampling!r} is not one of "
                    f"{flow.TIMESTEP_KINDS}")
  if not 0.0 <= float(t.caption_dropout) <= 1.0:
    problems.append(f"train.caption_dropout must be in [0, 1], got {t.caption_dropout}")
  if not 0.0 <= float(t.ema_decay) < 1.0:
    problems.append(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
  if config.flow.timestep_sampling == "logit_normal" and not float(config.flow.logit_std) > 0:
    problems.append(f"flow.logit_std must be > 0, got {config.flow.logit_std}")
  if float(t.remat_memory_budget_gib) < 0:
    problems.append("train.remat_memory_budget_gib must be >= 0 (0: the device's memory), got "
                    f"{t.remat_memory_budget_gib}")
  if not 0.0 <= float(t.remat_headroom) < 1.0:
    problems.append(f"train.remat_headroom must be in [0, 1), got {t.remat_headroom}")
  if int(config.data.resolution) < 1:
    problems.append(f"data.resolution must be >= 1, got {config.data.resolution}")
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
    elif not manifest.get("num_records"):  # before the state is built, not at the loader
      problems.append(f"data.path {path!r} holds no records (its {records.MANIFEST_NAME} lists "
                      "0: every input of its precompute was bad)")
    elif model_cfg is not None:
      kind = manifest["text"]["kind"]
      if config.text.encoder_dir or kind == "token_ids":
        problems += _encoder_problems(config, model_cfg, manifest, kind)
      if kind == "token_ids":  # online mode: the trainer runs the frozen text encoder
        if model_cfg.remat_policy == "auto":  # its step takes the encoder's params as an input
          problems.append("model.remat_policy 'auto' does not support online text mode (data.path "
                          "holds token ids) yet: set a policy (svg_jax/models/nextdit.py)")
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
        # Without text.encoder_dir (reported above) online mode has no tokenizer for its <bos>.
        online = kind == "token_ids"
        empty = (load_empty_text(config, log_substitute=False, online=online)
                 if config.text.encoder_dir or not online else None)
        if empty is None or online:
          pass  # token ids of the empty prompt; their features come from the text encoder
        elif empty.shape[1] != model_cfg.cap_feat_dim:
          problems.append(f"data.empty_text has dim {empty.shape[1]}, model.cap_feat_dim is "
                          f"{model_cfg.cap_feat_dim}")
        if empty is not None and empty.shape[0] > min(config.data.caption_len_buckets
                                                      or (config.data.max_caption_len,)):
          problems.append(f"data.empty_text has {empty.shape[0]} tokens, more than the shortest "
                          "caption length bucket")
      except (OSError, ValueError) as e:
        problems.append(str(e))
    if manifest is not None and manifest.get("num_records"):
      try:  # as the loader checks them, but before the state is built
        records.check_fingerprints(manifest, ae_lib.config_fingerprints(config.autoencoder))
      except (OSError, ValueError) as e:
        problems.append(f"data.path: {e}")
  try:
    pipeline_config(config, max(gb // max(process_count, 1), 1)).validate()
  except ValueError as e:
    problems.append(f"data: {e}")
  manifest = _manifest_or_none(path) if path and os.path.isdir(path) else None
  problems += validation.config_problems(config, model_cfg,
                                         manifest["text"]["kind"] if manifest else None)
  eval_path = config.data.eval_path
  eval_manifest = _manifest_or_none(eval_path) if eval_path else None
  if (eval_manifest is not None and eval_manifest["text"]["kind"] == "token_ids"
      and config.text.encoder_dir):  # unreadable or missing: validation.config_problems says so
    try:
      vocab = config_from_hf_json(config.text.encoder_dir).vocab_size
    except (OSError, ValueError):
      vocab = None  # reported by _encoder_problems
    if vocab is not None:
      problems += _tokenizer_problems(config, eval_manifest, "data.eval_path", vocab)
  return problems


def _encoder_problems(config, model_cfg, manifest, kind: str) -> list[str]:
  """text.encoder_dir against the model and the records: it encodes the token ids (online mode)
  and, in either mode, the validation prompts."""
  if not config.text.encoder_dir:
    return [f"data.path {config.data.path!r} holds token ids: set text.encoder_dir to the local "
            "Gemma-2 folder the trainer runs on them (online mode)"]
  try:
    text_cfg = config_from_hf_json(config.text.encoder_dir,
                                   hidden_layer=int(config.text.hidden_layer))
  except (OSError, ValueError) as e:
    return [f"text.encoder_dir: {e}"]
  problems = []
  if text_cfg.hidden_size != model_cfg.cap_feat_dim:
    problems.append(f"the text encoder's hidden size {text_cfg.hidden_size} != model.cap_feat_dim "
                    f"{model_cfg.cap_feat_dim}")
  if kind == "token_ids":
    problems += _tokenizer_problems(config, manifest, "data.path", text_cfg.vocab_size)
  return problems


def _folder_tokenizer_fingerprints(folder: str) -> Iterator[str]:
  """The fingerprints that name the tokenizer of `folder` in a manifest: the current one (its
  tokenizer files), then that of the whole folder, as precompute recorded a text_encoder_dir's
  tokenizer before (computed last: it hashes the weights)."""
  yield precompute.tokenizer_fingerprint(folder)
  yield precompute.earlier_tokenizer_fingerprint(folder)


def _tokenizer_problems(config, manifest, what: str, vocab_size: int) -> list[str]:
  """Token ids mean something only to the tokenizer that made them: the one precompute recorded
  in the manifest's text fingerprint must be text.encoder_dir's, and its ids must fit the
  encoder's embedding (an id past vocab_size embeds as NaN, a "diverged" loss at step 1)."""
  folder = config.text.encoder_dir
  made_by = precompute.fingerprint_fields(
      manifest.get("fingerprints", {}).get("text_encoder", "")).get("tokenizer")
  ours = None
  if made_by:  # synthetic records carry no tokenizer to compare
    try:
      fingerprints = _folder_tokenizer_fingerprints(folder)
      ours = next(fingerprints)
      same = made_by == ours or made_by == next(fingerprints)
    except OSError as e:
      return [f"text.encoder_dir: {e}"]
    if not same:
      return [f"{what} holds token ids of the tokenizer {made_by}, but text.encoder_dir "
              f"{folder!r} has the tokenizer {ours}: precompute the records with this folder "
              "(precompute.text_encoder_dir or a tokenizer_dir holding its tokenizer files)"]
  size = (manifest.get("precompute") or {}).get("tokenizer_size")
  if size is None and made_by:  # the same tokenizer: its ids are < its length
    try:
      size = len(text_lib.load_tokenizer(folder))
    except (OSError, ValueError) as e:
      return [f"text.encoder_dir: {e}"]
  if size is not None and int(size) > vocab_size:
    return [f"{what} holds token ids of a tokenizer of {size} tokens, more than the text "
            f"encoder's vocab_size {vocab_size} (text.encoder_dir {folder!r})"]
  return []


def text_source_warning(config) -> str | None:
  """Features records: what differs between the encoder that made them (the manifest's text
  fingerprint) and text.encoder_dir, which encodes the validation prompts; None when nothing
  does or nothing can be compared."""
  manifest = _manifest_or_none(config.data.path) if config.data.path else None
  if (manifest is None or not config.text.encoder_dir
      or manifest["text"]["kind"] != "text_features"):
    return None
  fields = precompute.fingerprint_fields(manifest.get("fingerprints", {}).get("text_encoder", ""))
  differ = []
  try:
    if "model" in fields:
      ours = ae_lib.path_fingerprint(config.text.encoder_dir)  # as precompute's `model=`
      if fields["model"] != ours:
        differ.append(f"weights {fields['model']} vs {ours}")
  except OSError:
    pass  # config_problems reports a missing text.encoder_dir
  if "layer" in fields and fields["layer"] != str(int(config.text.hidden_layer)):
    differ.append(f"hidden layer {fields['layer']} vs text.hidden_layer "
                  f"{int(config.text.hidden_layer)}")
  prompt = fields.get("system_prompt", "auto")
  # "auto" (the official rule) trains `base`, and `align` on super-high-quality captions.
  trained = ("base", "align") if prompt == "auto" else (prompt,)
  if config.validation.system_prompt not in trained:
    differ.append(f"system prompt {prompt}{' (base or align)' if prompt == 'auto' else ''} vs "
                  f"validation.system_prompt {config.validation.system_prompt}")
  if not differ:
    return None
  return (f"the validation prompts are encoded by text.encoder_dir {config.text.encoder_dir!r}, "
          "unlike the records' features of data.path (" + "; ".join(differ) + "): the grids "
          "condition on features unlike those the model trains on")


def text_conditioning(config, manifest: dict | None) -> dict:
  """How data.path's captions became the DiT's conditioning, as far as its manifest says: the
  records' kind, the Gemma-2 hidden layer (the records' for features, text.hidden_layer's when the
  trainer encodes token ids) and the system prompt rule (precompute.system_prompt: a name of
  text.SYSTEM_PROMPTS or "auto"). Saved with the run, so that a sampler encodes its prompts the
  same way (dit_checkpoint.saved_text_conditioning)."""
  if manifest is None:
    return {}
  made = manifest.get("precompute") or {}
  kind = manifest["text"]["kind"]
  out = {"kind": kind}
  if kind == "token_ids":
    out["hidden_layer"] = int(config.text.hidden_layer)
  elif "hidden_layer" in made:
    out["hidden_layer"] = int(made["hidden_layer"])
  if "system_prompt" in made:
    out["system_prompt"] = str(made["system_prompt"])
  return out


def load_text_encoder(config, mesh):
  """Online mode: (Gemma2Encoder, params placed on `mesh` by their logical axes, shardings)."""
  cfg = config_from_hf_json(config.text.encoder_dir, hidden_layer=int(config.text.hidden_layer))
  model = Gemma2Encoder(cfg)
  ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  boxed = jax.eval_shape(lambda i: model.init(jax.random.PRNGKey(0), i, jnp.ones((1, 8), bool)),
                         ids)["params"]
  shardings = parallel.logical_shardings(boxed, mesh, config.axis_rules)
  params = jax.device_put(load_gemma2(config.text.encoder_dir, cfg, only_needed=True), shardings)
  return model, params, shardings



def stand_in_empty_text(dim: int) -> np.ndarray:
  """One fixed token of unit RMS [1, dim]. Not zeros: a valid all-zero caption token leaves the
  caption stream at the embedder's bias, whose RMSNorm gradient grows as 1 / rms; on the 2.6B
  model a batch with a dropped caption had a gradient norm of 2e7 against 0.1 on the others."""
  token = np.random.default_rng(0).standard_normal((1, dim))
  return (token / np.sqrt(np.mean(token ** 2))).astype(np.float32)


def load_empty_text(config, *, log_substitute: bool = True, online: bool = False) -> np.ndarray:
  """The empty-prompt features [Le, D] (see `data.empty_text` in svg_jax/config.py); `online`
  (data.path holds token ids): its token ids [Le], the stand-in being the tokenizer's [<bos>]."""
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
    why = ("data.empty_text is stand_in" if spec == "stand_in" else
           f"no {EMPTY_TEXT_FILE} in {config.data.path}")
    if online:  # "" tokenizes to <bos> alone: the true empty prompt, not a stand-in
      ids = np.asarray([text_lib.load_tokenizer(config.text.encoder_dir).bos_token_id], np.int32)
      if log_substitute:
        logging.info("%s: the empty prompt is the tokenizer's [<bos>] %s", why, ids.tolist())
      return ids
    if log_substitute:
      logging.warning("%s: the empty prompt is one fixed unit-RMS feature token (a stand-in for "
                      "<bos> features; fine for synthetic data)", why)
    return stand_in_empty_text(dim)
  arr = np.load(path)
  if online != np.issubdtype(arr.dtype, np.integer):
    want = ("token ids (int [tokens]), as data.path holds token ids" if online else
            "features (float [tokens, dim]), as data.path holds text features")
    raise ValueError(f"data.empty_text {path!r} holds {arr.dtype} {list(arr.shape)}; it must be "
                     f"the empty prompt's {want}")
  if online:  # the empty prompt's token ids [Le] (or [1, Le])
    if arr.ndim not in (1, 2) or arr.size < 1 or (arr.ndim == 2 and arr.shape[0] != 1):
      raise ValueError(f"data.empty_text {path!r} has shape {list(arr.shape)}; expected token ids "
                       "[tokens]")
    return arr.reshape(-1).astype(np.int32)
  arr = arr.astype(np.float32)
  if arr.ndim == 3 and arr.shape[0] == 1:
    arr = arr[0]
  if arr.ndim != 2 or arr.shape[0] < 1:
    raise ValueError(f"data.empty_text {path!r} has shape {arr.shape}; expected [tokens, dim]")
  return arr


def pipeline_config(config, per_process_batch: int) -> pipeline_lib.PipelineConfig:
  """The record loader's settings for `config` (also what aot.abstract_batch's dtypes follow)."""
  d = config.data
  return pipeline_lib.PipelineConfig(
      per_process_batch_size=per_process_batch, max_caption_len=int(d.max_caption_len),
      caption_len_buckets=tuple(d.caption_len_buckets),
      num_caption_buckets=int(d.num_caption_buckets), seed=int(d.shuffle_seed),
      prefetch_buffer_size=int(d.prefetch), num_threads=int(d.num_threads),
      num_workers=int(d.num_workers))


def make_data_iterator(config, mesh=None):
  """The record iterator of a DiT config (a Grain iterator that checkpoints its position). With
  `mesh`, each process reads the rows of the global batch that its devices hold there."""
  per_process = int(config.train.global_batch_size) // jax.process_count()
  expected = ae_lib.config_fingerprints(config.autoencoder)
  rows = None if mesh is None else parallel.process_batch_rows(
      mesh, int(config.train.global_batch_size))
  return pipeline_lib.make_pipeline(config.data.path, pipeline_config(config, per_process),
                                    expected_fingerprints=expected, rows=rows)


class DiTSetup:
  """Model, optimizer, abstract state and shardings, jitted init and step for one mesh."""

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
    manifest = _manifest_or_none(config.data.path) if config.data.path else None
    online = manifest is not None and manifest["text"]["kind"] == "token_ids"
    self.saved_facts = {dit_checkpoint.TEXT_CONDITIONING: text_conditioning(config, manifest)}
    self.empty_text = load_empty_text(config, online=online)
    text_model = None
    repl = parallel.replicated(mesh)
    self.validation = None
    self.text_encoder = (None, None)  # online mode: the frozen text encoder and its placed params
    if online:
      text_model, text_params, text_sh = load_text_encoder(config, mesh)
      self.text_encoder = (text_model, text_params)
      text_batch = (("token_ids", 2), ("text_mask", 2), ("text_len", 1))
    else:
      text_batch = (("text", 3), ("text_mask", 2), ("text_len", 1))
    step = dit_step.make_train_step(self.model, self.tx, config, self.empty_text, text_model)
    batch_sh = {k: parallel.batch_sharding(mesh, nd) for k, nd in (("latent", 4),) + text_batch}
    self.batch_keys = tuple(batch_sh)
    if online:  # the frozen text params are an input of every step, never part of the state
      jitted = jax.jit(step, in_shardings=(self.state_shardings, batch_sh, repl, text_sh),
                       out_shardings=(self.state_shardings, repl), donate_argnums=0)
      self._step_inputs = (jitted, (text_params,))
      self.step = lambda state, batch, rng: jitted(state, batch, rng, text_params)
    else:
      self.step = jax.jit(step, in_shardings=(self.state_shardings, batch_sh, repl),
                          out_shardings=(self.state_shardings, repl), donate_argnums=0)
      self._step_inputs = (self.step, ())

  def compile_step(self, state, batch, rng):
    jitted, frozen = self._step_inputs
    compiled = jitted.lower(state, batch, rng, *frozen).compile()
    return lambda state, batch, rng: compiled(state, batch, rng, *frozen)

  def logger_class(self, workdir: str, **kwargs) -> validation.ValidationLogger:
    """The loop's logger; the validation is built beside it (only a training run makes one, so
    AOT compiles and checkpoint reads never load a decoder or held-out records)."""
    logger = validation.ValidationLogger(workdir, **kwargs)
    t = self.config.train
    if int(t.sample_every) > 0 and self.text_encoder[0] is None:
      warning = text_source_warning(self.config)  # features records: the grids' prompts
      if warning:
        logging.warning("%s", warning)
    if int(t.sample_every) > 0 or int(t.eval_every) > 0:
      self.validation = validation.Validation(
          self.config, self.mesh, self.model, self.model_cfg, logger, workdir,
          text_model=self.text_encoder[0], text_params=self.text_encoder[1])
    return logger

  def init_state(self, seed: int):
    return self._init(jax.random.PRNGKey(seed))

  def state_from_params(self, params):
    return self._from_params(params)

  init_from_note = "the EMA starts as a copy of these params"  # the loop's init_from line

  def load_init_params(self, source: str, fmt: str, step: int | None):
    """(params on the state's shardings, step read or None) of `train.init_from`: a training
    workdir's params (fmt "") read straight into their shards, or weights in a `dit_io` format
    read on the host. A workdir of the other `model.scan_layers` is read in its own layout and
    restacked on the host (dit_io.params_from_tree)."""
    abstract = self.abstract_state.params
    what = f"train.init_from {source}: its params"
    if fmt:
      return ckpt_lib.place_params(dit_io.load_dit(source, fmt, self.model_cfg), abstract,
                                   what), None
    directory, step = ckpt_lib.source_step(source, step, what="train.init_from")
    try:
      saved = ckpt_lib.read_saved_config(directory, step)
    except Exception:  # noqa: BLE001  (the params' own checks then say what does not fit)
      saved = None
    saved = saved if isinstance(saved, dict) else {}
    scanned = (saved.get("model") or {}).get("scan_layers")
    if (saved.get("task", "dit") != "dit" or scanned is None
        or bool(scanned) == self.model_cfg.scan_layers):
      return ckpt_lib.load_params(source, abstract, step, task="dit")
    logging.info("train.init_from %s: its run has model.scan_layers %s, this one %s: its params "
                 "are read into host memory and restacked", source, bool(scanned),
                 self.model_cfg.scan_layers)
    # Read in the source's layout onto this host's CPU (every process reads its own copy).
    layout = dataclasses.replace(self.model_cfg, scan_layers=bool(scanned))
    host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    saved_abstract = parallel.abstract_arrays(nn.meta.unbox(abstract_params(layout)), host)
    tree, step = ckpt_lib.load_params(source, saved_abstract, step, task="dit")
    tree = dit_io.params_from_tree(jax.device_get(tree), self.model_cfg)
    return ckpt_lib.place_params(tree, abstract, what), step

  def device_batch(self, local_batch: dict) -> dict:
    return parallel.global_batch({k: local_batch[k] for k in self.batch_keys}, self.mesh)

  def make_data_iterator(self):
    return make_data_iterator(self.config, self.mesh)

  def batch_counts(self, local_batch: dict) -> tuple[int, int, float]:
    """(images, tokens, FLOPs) of one global step on a batch shaped like `local_batch`."""
    _, h, w = local_batch["latent"].shape[:3]
    cap_len = local_batch["text_mask"].shape[1]
    p = self.model_cfg.patch_size
    gb = int(self.config.train.global_batch_size)
    flops = flop_count.dit_train_flops(self.model_cfg, gb, (h, w), cap_len)
    if self.text_encoder[0] is not None:  # online mode: the frozen encoder's forward, no backward
      flops += flop_count.gemma2_forward_flops(self.text_encoder[0].cfg, gb, cap_len)
    return (gb, gb * ((h // p) * (w // p) + cap_len), flops)

  def poison(self, local_batch: dict) -> dict:
    return dict(local_batch, latent=np.full_like(local_batch["latent"], np.nan))

  def eval_due(self, step: int, at_end: bool) -> bool:
    return self.validation is not None and self.validation.due(step, at_end)

  def compile_eval(self, state) -> None:
    if self.validation is not None:
      self.validation.compile(state)

  def evaluate(self, state, step: int) -> dict:
    return self.validation.run(state, step)


# remat "auto" (svg_jax/train/remat.py) compiles this module's steps, so the registry
# (trainer.py) attaches it as the task's resolve_config.
TASK = task_api.Task(name="dit", config_problems=config_problems, make_setup=DiTSetup)
