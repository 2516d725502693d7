"""Watching a DiT run: sample grids of fixed prompts and a held-out flow loss per noise level.

Both run through the DiT task's `compile_eval` (with the first step's compile) / `eval_due` /
`evaluate` hooks of the shared loop (svg_jax/train/dit_task.py) and only read the train state:
no parameter, optimizer moment, step rng or data-iterator position changes, so a resumed run
logs what an uninterrupted one logs.

Grids (`train.sample_every`, the `validation` config section): the validation prompts are
sampled with the EMA params through `generate.Generator.latents_from_features`, the program
`launch/sample.py` runs (jitted once, the batch split over the training mesh, the weights kept on
the training shardings), from the noise of fixed seeds, then decoded by `autoencoder.decoder_path`
and laid out with `generate.make_grid`. Process 0 writes `<workdir>/samples/step_XXXXXX.png` and
the TensorBoard image `validation/samples`. The prompts' text features are made once at start-up:
by the Gemma-2 of `text.encoder_dir` when set, else read from `validation.text_features`, an .npz
written by `write_prompt_features` (launch/prompt_features.py). No decoder: one log line, no grids.

Held-out loss (`train.eval_every`, `data.eval_path`): the first `validation.loss_records` records
of a precomputed folder, record i with the fixed noise `heldout_noise(loss_seed, i, shape)`, each
at every time of `validation.loss_timesteps` (t = 1 is data, svg_jax/flow.py), its caption
unchanged (no dropout). `loss_t0.20` is the mean over the records of the per-record velocity MSE
at t = 0.2, `loss_mean` the mean over the times; they go to metrics.jsonl ("eval" records) and
to TensorBoard as `eval/loss_t0.20`, ... Records are batched by latent size, captions padded to
one length (padding changes no output: the DiT masks padded caption keys).
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from svg_jax import autoencoder as ae_lib
from svg_jax import flow, generate, parallel, text
from svg_jax.data import jsonl, records
from svg_jax.train import metrics as metrics_lib
from svg_jax.utils import atomic_files
from svg_jax.utils.rounding import round_up

SAMPLES_DIR = "samples"
IMAGE_TAG = "validation/samples"
_FEATURE_KEYS = ("prompts", "features", "mask", "uncond_features", "uncond_mask")


def grid_path(workdir: str, step: int) -> str:
  return os.path.join(workdir, SAMPLES_DIR, f"step_{step:06d}.png")


def loss_key(t: float) -> str:
  """The metric name of the held-out loss at time t: 0.2 -> "loss_t0.20"."""
  return f"loss_t{t:.2f}"


def heldout_noise(seed: int, index: int, shape: Sequence[int]) -> np.ndarray:
  """The fixed noise x0 of held-out record `index`: N(0, 1) float32 from numpy's PCG64 seeded with
  (seed, index), so it depends on neither the mesh nor the batching."""
  return np.random.default_rng([int(seed), int(index)]).standard_normal(tuple(shape), np.float32)


# ----------------------------------------------------------------------------- prompts


def read_prompts(vcfg) -> list[str]:
  """`validation.prompts` then the `prompt`s of `validation.prompts_file` (jsonl)."""
  prompts = [str(p) for p in vcfg.prompts]
  if vcfg.prompts_file:
    try:
      prompts += jsonl.prompts(vcfg.prompts_file)
    except ValueError as e:
      raise ValueError(f"validation.prompts_file {e}") from None
  return prompts


def prompt_features(text_encoder, prompts: Sequence[str],
                    pad_multiple: int = text.PAD_MULTIPLE) -> dict[str, np.ndarray]:
  """The validation file's arrays: the prompts' features [N, L, D] fp32 and mask [N, L] at one
  length (`generate.padded_text_length`, as the generator pads them), and the
  empty prompt's [1, L, D] / [1, L] (the CFG's unconditional rows, as `Generator._uncond`)."""
  prompts = list(prompts)
  length = generate.padded_text_length(text_encoder, prompts, pad_multiple)
  feats, mask = generate.encode_prompts(text_encoder, prompts, length)
  e_feats, e_mask = generate.encode_prompts(text_encoder, [text.UNCONDITIONAL], length)
  return dict(prompts=np.asarray(prompts, dtype=np.str_), features=feats, mask=mask,
              uncond_features=e_feats, uncond_mask=e_mask)


def write_prompt_features(path: str, prompts: Sequence[str], text_encoder) -> str:
  """Writes the .npz `validation.text_features` reads (`prompt_features` of `text_encoder`, a
  `text.TextEncoder` with the system prompt sampling should use); returns `path`."""
  arrays = prompt_features(text_encoder, prompts)
  atomic_files.write(path, lambda tmp: _savez(tmp, arrays))
  return path


def _savez(tmp: str, arrays: dict) -> None:
  with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
    np.savez(f, **arrays)


def load_prompt_features(path: str, prompts: Sequence[str]) -> dict[str, np.ndarray]:
  """The arrays of a `write_prompt_features` file, checked against the configured prompts."""
  with np.load(path) as f:
    missing = [k for k in _FEATURE_KEYS if k not in f]
    if missing:
      raise ValueError(f"validation.text_features {path!r} lacks {missing} (write it with "
                       "validation.write_prompt_features)")
    arrays = {k: f[k] for k in _FEATURE_KEYS}
  if [str(p) for p in arrays["prompts"]] != list(prompts):
    raise ValueError(f"validation.text_features {path!r} holds features of other prompts than "
                     "validation.prompts / prompts_file")
  for k in ("features", "uncond_features"):
    arrays[k] = arrays[k].astype(np.float32)
  return arrays


# ----------------------------------------------------------------------------- config checks


def sampler_settings(v) -> generate.SamplerSettings:
  """The grids' sampler from the `validation` section."""
  return generate.SamplerSettings(steps=int(v.steps), cfg_scale=float(v.cfg_scale),
                                  cfg_mode=v.cfg_mode, shift=float(v.shift), solver=v.solver,
                                  renorm=float(v.renorm))


def config_problems(config, model_cfg, train_text_kind: str | None) -> list[str]:
  """What the validation fields need (nothing compiles; files are only looked at)."""
  problems: list[str] = []
  t, v = config.train, config.validation
  for name in ("sample_every", "eval_every"):
    if int(t[name]) < 0:
      problems.append(f"train.{name} must be >= 0 (0 = off), got {t[name]}")
  if int(t.sample_every) > 0:
    try:
      prompts = read_prompts(v)
    except (OSError, ValueError) as e:
      prompts = None
      problems.append(str(e))
    if prompts is not None and not prompts:
      problems.append("train.sample_every > 0 needs validation.prompts or validation.prompts_file")
    if prompts and v.seeds and len(v.seeds) != len(prompts):
      problems.append(f"validation.seeds has {len(v.seeds)} seeds for {len(prompts)} prompts")
    if not config.text.encoder_dir and not v.text_features:
      problems.append("train.sample_every > 0 needs the prompts' text features: set "
                      "text.encoder_dir (a local Gemma-2 folder) or validation.text_features "
                      "(an .npz of launch/prompt_features.py)")
    elif not config.text.encoder_dir and not os.path.isfile(v.text_features):
      problems.append(f"validation.text_features {v.text_features!r} does not exist")
    elif not config.text.encoder_dir and prompts:
      try:
        load_prompt_features(v.text_features, prompts)
      except (OSError, ValueError) as e:
        problems.append(str(e))
    for name in ("batch_size", "grid_cols", "resolution"):
      if int(v[name]) < 0:
        problems.append(f"validation.{name} must be >= 0 (0 = the default), got {v[name]}")
    try:
      sampler_settings(v).validate()
    except ValueError as e:
      problems.append(f"validation: {e}")
    if v.system_prompt not in text.SYSTEM_PROMPTS:
      problems.append(f"validation.system_prompt {v.system_prompt!r} is not one of "
                      f"{sorted(text.SYSTEM_PROMPTS)}")
    if config.autoencoder.decoder_path and not config.autoencoder.stats_path:
      problems.append("validation grids decode with autoencoder.decoder_path and need "
                      "autoencoder.stats_path (the latent statistics) too")
  if int(t.eval_every) > 0 and not config.data.eval_path:
    problems.append("train.eval_every > 0 needs data.eval_path (a held-out records folder)")
  if config.data.eval_path:
    problems += _eval_data_problems(config, model_cfg, train_text_kind)
  if int(v.loss_records) < 1 or int(v.loss_batch_size) < 1:
    problems.append("validation.loss_records and validation.loss_batch_size must be >= 1")
  bad_t = [x for x in v.loss_timesteps if not 0.0 <= float(x) <= 1.0]
  if bad_t or not v.loss_timesteps:
    problems.append(f"validation.loss_timesteps must be times in [0, 1], got {v.loss_timesteps}")
  return problems


def _eval_data_problems(config, model_cfg, train_text_kind) -> list[str]:
  path = config.data.eval_path
  try:
    manifest = records.read_manifest(path)
  except (OSError, ValueError) as e:
    return [f"data.eval_path: {e}"]
  problems = []
  kind = manifest["text"]["kind"]
  if train_text_kind is not None and kind != train_text_kind:
    problems.append(f"data.eval_path holds {kind} but data.path holds {train_text_kind}")
  if model_cfg is not None:
    if manifest["latent_channels"] != model_cfg.in_channels:
      problems.append(f"data.eval_path's latents have {manifest['latent_channels']} channels, "
                      f"model.in_channels is {model_cfg.in_channels}")
    if kind == "text_features" and manifest["text"].get("dim") != model_cfg.cap_feat_dim:
      problems.append(f"data.eval_path's text features have dim {manifest['text'].get('dim')}, "
                      f"model.cap_feat_dim is {model_cfg.cap_feat_dim}")
  try:
    records.check_fingerprints(manifest, ae_lib.config_fingerprints(config.autoencoder))
  except (OSError, ValueError) as e:
    problems.append(f"data.eval_path: {e}")
  return problems


# ----------------------------------------------------------------------------- helpers


class ValidationLogger(metrics_lib.MetricsLogger):
  """The shared logger (which also puts "eval" numbers into TensorBoard) plus the grid images
  (process 0 only, like every record)."""

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """uint8 [H, W, 3] -> a TensorBoard image summary."""
    if self.is_main:
      self._tb.add_image(tag, image, step, dataformats="HWC")
      self._tb.flush()


# ----------------------------------------------------------------------------- grids


def grid_text_encoder(config, mesh, text_model=None, text_params=None) -> text.TextEncoder:
  """The encoder of the validation prompts (`text.encoder_dir` set): in online mode the trainer's
  own Gemma-2 (`text_model`, its `text_params` placed on `mesh`), else that folder's, loaded. A
  second copy beside the trainer's would be read from disk and held whole on one device."""
  kwargs = dict(system_prompt=text.system_prompt(config.validation.system_prompt),
                max_length=text.SAMPLE_MAX_LENGTH)
  if text_params is not None:
    return text.TextEncoder(text_model.cfg, text_params, text.load_tokenizer(
        config.text.encoder_dir), mesh=mesh, **kwargs)
  return text.TextEncoder.from_pretrained(
      config.text.encoder_dir, hidden_layer=int(config.text.hidden_layer), **kwargs)


class GridSampler:
  """The validation prompts' features, seeds and the Generator program, made once."""

  def __init__(self, config, mesh, model_cfg, decoder, text_model=None, text_params=None):
    v = config.validation
    prompts = read_prompts(v)
    if config.text.encoder_dir:
      arrays = prompt_features(grid_text_encoder(config, mesh, text_model, text_params), prompts)
    else:
      arrays = load_prompt_features(v.text_features, prompts)
    if arrays["features"].shape[-1] != model_cfg.cap_feat_dim:
      raise ValueError(f"the validation prompts' features have dim {arrays['features'].shape[-1]},"
                       f" model.cap_feat_dim is {model_cfg.cap_feat_dim}")
    self.settings = sampler_settings(v)
    self.generator = generate.Generator(model_cfg, None, None, decoder, mesh=mesh)
    resolution = int(v.resolution) or int(config.data.resolution)
    self.latent_shape = self.generator.latent_shape(resolution)
    self.size = (resolution, resolution)
    self.n = len(prompts)
    self.cols = int(v.grid_cols) or math.ceil(math.sqrt(self.n))
    seeds = [int(s) for s in v.seeds] or list(range(self.n))
    chunk = round_up(int(v.batch_size) if int(v.batch_size) > 0 else self.n,
                     self.generator.batch_multiple())
    self.batches = []  # (features [2B, L, D], mask [2B, L], seeds [B], real rows k)
    feats, mask = arrays["features"], arrays["mask"]
    for start in range(0, self.n, chunk):
      f, m, s = feats[start:start + chunk], mask[start:start + chunk], seeds[start:start + chunk]
      k = len(s)
      if k < chunk:  # pad with empty prompts and seed 0, as Generator.latents does
        f = np.concatenate([f, np.repeat(arrays["uncond_features"], chunk - k, axis=0)])
        m = np.concatenate([m, np.repeat(arrays["uncond_mask"], chunk - k, axis=0)])
        s = s + [0] * (chunk - k)
      rows = generate.guided_rows(f, m, arrays["uncond_features"], arrays["uncond_mask"])
      self.batches.append((*rows, s, k))

  def compile(self, params) -> None:
    """Compiles ahead what `latents(params)` runs: one program, every batch padded to one shape."""
    feats, mask, seeds, _ = self.batches[0]
    self.generator.params = params
    try:
      self.generator.compile_latents(feats, mask, seeds, self.latent_shape, self.settings)
    finally:
      self.generator.params = None

  def latents(self, params) -> np.ndarray:
    """Latents [N, h, w, C] of every prompt with `params` (on every process)."""
    self.generator.params = params
    try:
      out = [self.generator.latents_from_features(f, m, s, self.latent_shape, self.settings)[:k]
             for f, m, s, k in self.batches]
    finally:
      self.generator.params = None  # the state is donated to the next step
    return np.concatenate(out)


# ----------------------------------------------------------------------------- held-out loss


class HeldoutLoss:
  """The fixed held-out records with their noise, and one jitted loss per latent size."""

  def __init__(self, config, mesh, model, text_model=None, text_params=None):
    v = config.validation
    self.mesh, self.model = mesh, model
    self.timesteps = tuple(float(x) for x in v.loss_timesteps)
    self.text_model, self.text_params = text_model, text_params
    items = []
    for _, rec in records.iter_records(config.data.eval_path):
      items.append(rec)
      if len(items) == int(v.loss_records):
        break
    if not items:
      raise ValueError(f"data.eval_path {config.data.eval_path!r} holds no records")
    self.count = len(items)
    online = "token_ids" in items[0]
    key = "token_ids" if online else "text_features"
    length = max(int(r["text_len"]) for r in items)
    length = round_up(length, text.PAD_MULTIPLE)  # one caption length
    chunk = round_up(int(v.loss_batch_size), parallel.batch_axis_size(mesh))
    groups: dict[tuple, list[int]] = {}
    for i, rec in enumerate(items):
      groups.setdefault(tuple(rec["latent"].shape), []).append(i)
    self.batches = []  # (x1, x0, text, mask, weight [B]) host arrays
    for shape, idx in groups.items():
      for start in range(0, len(idx), chunk):
        part = idx[start:start + chunk]
        x1 = np.zeros((chunk,) + shape, np.float32)
        x0 = np.zeros_like(x1)
        cap = items[0][key]
        txt = np.zeros((chunk, length) + cap.shape[1:], np.int32 if online else np.float32)
        mask = np.zeros((chunk, length), bool)
        weight = np.zeros((chunk,), np.float32)
        for row, i in enumerate(part):
          n = int(items[i]["text_len"])
          x1[row] = items[i]["latent"].astype(np.float32)
          x0[row] = heldout_noise(int(v.loss_seed), i, shape)
          txt[row, :n] = items[i][key][:n]
          mask[row, :n] = True
          weight[row] = 1.0
        mask[len(part):, 0] = True  # padding rows: one valid token keeps them finite
        self.batches.append((x1, x0, txt, mask, weight))
    self._fn = jax.jit(self._per_sample, out_shardings=parallel.replicated(mesh))

  def _per_sample(self, params, text_params, x1, x0, txt, mask):
    """Per-record velocity MSE [T, B] at each fixed time."""
    if self.text_model is not None:
      txt = self.text_model.apply({"params": text_params}, txt, mask)[0].astype(jnp.float32)

    def at(t):  # one model in the program whatever the number of times (lax.map, not unrolled)
      tb = jnp.full((x1.shape[0],), t, jnp.float32)
      v = self.model.apply({"params": params}, flow.interpolate(x0, x1, tb)[0], tb, txt, mask)
      return flow.flow_matching_loss(v, x0, x1)[1]

    return jax.lax.map(at, jnp.asarray(self.timesteps, jnp.float32))

  def _args(self, params, batch) -> tuple:
    return (params, self.text_params,
            *(parallel.split_host_array(a, self.mesh) for a in batch[:4]))

  def compile(self, params) -> None:
    """Compiles ahead the loss of each batch shape for params placed like `params` (jit keeps
    them), so `__call__` compiles nothing."""
    done = set()
    for batch in self.batches:
      shapes = tuple(a.shape for a in batch)
      if shapes not in done:
        done.add(shapes)
        self._fn.lower(*self._args(params, batch)).compile()

  def __call__(self, params) -> dict[str, float]:
    sums = np.zeros((len(self.timesteps),), np.float64)
    for batch in self.batches:
      per = parallel.replicated_to_host(self._fn(*self._args(params, batch))).astype(np.float64)
      sums += per @ batch[-1]
    means = sums / self.count
    out = {loss_key(t): float(m) for t, m in zip(self.timesteps, means)}
    out["loss_mean"] = float(np.mean(means))
    out["heldout_records"] = self.count
    return out


# ----------------------------------------------------------------------------- both


class Validation:
  """What the DiT task's `eval_due` / `evaluate` run; built when the loop makes its logger."""

  def __init__(self, config, mesh, model, model_cfg, logger: ValidationLogger, workdir: str, *,
               text_model=None, text_params=None):
    t = config.train
    self.num_steps = int(t.num_steps)
    self.sample_every, self.eval_every = int(t.sample_every), int(t.eval_every)
    self.logger, self.workdir = logger, workdir
    self.loss_on_ema = bool(config.validation.loss_on_ema)
    self.is_main = jax.process_index() == 0
    self.grids = self.heldout = None
    if self.sample_every > 0:
      if not config.autoencoder.decoder_path:
        logging.info("validation: no autoencoder.decoder_path, so no sample grids (the prompts "
                     "are not sampled)")
      else:
        # Decoding is one process's work, on its own devices; the sampling is everyone's.
        local = parallel.make_mesh(dict(data=-1, fsdp=1, tensor=1), jax.local_devices())
        decoder = ae_lib.SVGAutoencoder.from_config(config, encoder=False, decoder=True,
                                                    mesh=local)
        self.grids = GridSampler(config, mesh, model_cfg, decoder, text_model, text_params)
        logging.info("validation: %d prompts every %d steps into %s", self.grids.n,
                     self.sample_every, os.path.join(workdir, SAMPLES_DIR))
    if self.eval_every > 0:
      self.heldout = HeldoutLoss(config, mesh, model, text_model, text_params)
      logging.info("validation: held-out loss of %d records of %s every %d steps",
                   self.heldout.count, config.data.eval_path, self.eval_every)
    self._due = (False, False)

  def due(self, step: int, at_end: bool) -> bool:
    # After the last step too, but not at a preemption signal: that saves and exits at once.
    end = at_end and step == self.num_steps
    self._due = (self.grids is not None and (step % self.sample_every == 0 or end),
                 self.heldout is not None and (step % self.eval_every == 0 or end))
    return any(self._due)

  def compile(self, state) -> None:
    """Compiles ahead what `run` runs: the held-out loss, the sampler and (process 0) the decoder.
    The loop calls it with the first step's compile, which the stall watch does not time, so the
    first validation waits for no compile (a host compiling for minutes longer would otherwise
    look stalled to the others)."""
    if self.heldout is not None:
      self.heldout.compile(self._loss_params(state))
    if self.grids is not None:
      self.grids.compile(state.ema_params)
      if self.is_main:
        self.grids.generator.autoencoder.compile_decode((self.grids.n, *self.grids.latent_shape))

  def _loss_params(self, state):
    return state.ema_params if self.loss_on_ema else state.params

  def run(self, state, step: int) -> dict[str, Any]:
    sample_now, loss_now = self._due
    out: dict[str, Any] = {}
    if loss_now:
      start = time.perf_counter()
      out.update(self.heldout(self._loss_params(state)))
      out["heldout_seconds"] = time.perf_counter() - start
    if sample_now:
      start = time.perf_counter()
      latents = self.grids.latents(state.ema_params)
      if self.is_main:
        grid = generate.make_grid(self.grids.generator.decode(latents), self.grids.cols)
        path = grid_path(self.workdir, step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_files.save_png(path, grid)
        self.logger.image(step, IMAGE_TAG, grid)
        out["samples"] = os.path.relpath(path, self.workdir)
      out["sample_seconds"] = time.perf_counter() - start
    return out
