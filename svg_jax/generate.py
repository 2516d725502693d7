"""Text-to-image generation: prompts -> text features -> one jitted guided trajectory -> pixels.

`Generator` holds the DiT params, the text encoder and the pixel decoder. `generate` runs, per
batch of prompts, the official sampling recipe (docs/reference.md §4.3-4.4, §6):
- the negative prompt is the empty caption "" (<bos> only), stacked as [cond; uncond] rows and
  evaluated in ONE model call per solver step, on the same latent for both halves
  (`sampling.guided_velocity`);
- renorm-CFG (default, scale 4) or standard CFG, DPM-Solver++ 2M (default, shift 10) or an ODE
  solver, fp32 solver state;
- the initial noise of an image is `sampling.initial_noise(seed, [H/16, W/16, C])`; benchmark seeds
  are `sampling.eval_seed(i, k)` = 42 + 4 i + k.

Shapes stay static under jit: every batch has `batch_size` rows (the last one padded with empty
prompts, dropped afterwards) and the text features are padded to one length per call (the longest
prompt rounded up to a multiple of 8, or a fixed `text_length`). One trajectory program is compiled
per (batch, text length, latent size, sampler settings). Padding leaves the math of the valid
tokens as it is: the DiT masks padded caption keys and places image RoPE ids after the valid
caption tokens. It does not leave the bits: XLA sums floats of another shape in another order, so
another padded caption length (measured: 104 vs 168 tokens) or batch shape moves latents by ~4e-6
and can move a few uint8 pixels by one level. The same prompts, seeds, batch size and text length
give the same bytes on the same devices.

`image_batches` yields each batch's images as soon as it is decoded, so a caller can write them
as they come with memory bounded by one batch; `generate` gathers them for callers that want all.

Given a mesh, the batch is split over its (data, fsdp) axes and the weights are replicated.
The DiT comes from a training workdir (`dit_checkpoint.py`: EMA or raw params) or from
converted weights (`convert/dit_io.py`). Benchmark layouts: `eval/benchmarks.py`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from svg_jax import autoencoder as ae_lib
from svg_jax import config as config_lib
from svg_jax import parallel, sampling, text
from svg_jax.convert import dit_io
from svg_jax.models.nextdit import NextDiT, NextDiTConfig
from svg_jax import dit_checkpoint
from svg_jax.input_errors import InputError
from svg_jax.utils.rounding import round_up

# Official sampling defaults (scripts/sample.sh, eval/generation): 50 steps, CFG 4, DPM, shift 10.
DEFAULTS = dict(steps=50, cfg_scale=4.0, cfg_mode="renorm", shift=10.0, solver="dpm")


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """Everything a trajectory's program depends on besides the shapes (cfg_scale is traced)."""
  steps: int = DEFAULTS["steps"]
  cfg_scale: float = DEFAULTS["cfg_scale"]
  cfg_mode: str = DEFAULTS["cfg_mode"]
  shift: float = DEFAULTS["shift"]
  solver: str = DEFAULTS["solver"]
  renorm: float = 1.0

  def validate(self) -> None:
    problems = []
    if self.solver not in sampling.SOLVERS:
      problems.append(f"unknown solver {self.solver!r}; expected one of {sampling.SOLVERS}")
    if self.cfg_mode not in sampling.CFG_MODES:
      problems.append(f"unknown cfg mode {self.cfg_mode!r}; expected one of {sampling.CFG_MODES}")
    if not isinstance(self.steps, (int, np.integer)) or self.steps < 1:
      problems.append(f"steps must be a positive int, got {self.steps!r}")
    elif self.solver != "dpm" and self.steps < 2:
      problems.append(f"solver {self.solver!r} needs steps >= 2 (grid points), got {self.steps}")
    if not (math.isfinite(self.shift) and self.shift > 0):
      problems.append(f"shift must be a positive number, got {self.shift!r}")
    if not math.isfinite(self.cfg_scale):
      problems.append(f"cfg scale must be finite, got {self.cfg_scale!r}")
    if not math.isfinite(self.renorm):
      problems.append(f"renorm must be finite, got {self.renorm!r}")
    if problems:
      raise ValueError("; ".join(problems))


# ------------------------------------------------------------------------------------------------
# Resolutions and grids


def parse_resolution(spec: str | int | Sequence[int], multiple: int = 16) -> tuple[int, int]:
  """'WxH' (e.g. '1024x1024', '768x1344'), 'N' (square) or (h, w) -> (height, width) in pixels.

  Width and height must be positive multiples of `multiple` (the latent's pixels per token).
  """
  if isinstance(spec, str):
    m = re.fullmatch(r"\s*(\d+)\s*(?:[x\*]\s*(\d+))?\s*", spec.lower())
    if not m:
      raise InputError(f"resolution {spec!r} is not 'WIDTHxHEIGHT' (e.g. 1024x1024) or one number")
    w = int(m.group(1))
    h = int(m.group(2)) if m.group(2) else w
  elif isinstance(spec, (int, np.integer)):
    h = w = int(spec)
  else:
    h, w = (int(v) for v in spec)
  bad = [f"{name} {v}" for name, v in (("width", w), ("height", h)) if v <= 0 or v % multiple]
  if bad:
    raise InputError(f"resolution {w}x{h}: {' and '.join(bad)} not a positive multiple of "
                     f"{multiple} (one latent token covers {multiple}x{multiple} pixels)")
  return h, w


def config_pixels_per_token(config: ml_collections.ConfigDict) -> int:
  """The resolution multiple of a config, before anything is loaded: the encoder's patch (the
  pixels of one latent token, which the decoder upsamples by) times the DiT's patch. A loaded
  `Generator` gives the same as `pixels_per_token`."""
  return (int(config.autoencoder.encoder.patch_size)
          * int(config_lib.model_section(config).patch_size))


def make_grid(images: Sequence[np.ndarray] | np.ndarray, cols: int) -> np.ndarray:
  """uint8 images [N, H, W, 3] of one size -> one [rows * H, cols * W, 3] image, row-major,
  no spacing; empty cells of the last row are black."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"make_grid needs images [N, H, W, C] with N >= 1, got {images.shape}")
  if cols < 1:
    raise ValueError(f"grid columns must be >= 1, got {cols}")
  n, h, w, c = images.shape
  cols = min(cols, n)
  rows = -(-n // cols)
  grid = np.zeros((rows * h, cols * w, c), images.dtype)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
  return grid


# ------------------------------------------------------------------------------------------------
# The trajectory (pure, jitted with the params as an argument)


def trajectory(params, noise, cap_feats, cap_mask, cfg_scale, *, model: NextDiT,
               settings: SamplerSettings) -> jax.Array:
  """Noise [B, h, w, C] -> latents [B, h, w, C] (fp32). cap_feats / cap_mask hold 2B rows:
  [cond rows; uncond rows]; the solver sees only the B conditional states. Unguided
  (`cfg_mode` none), the model sees the B conditional rows alone: half the work."""
  if settings.cfg_mode == "none":
    b = noise.shape[0]

    def velocity(x, t):
      v = model.apply({"params": params}, x, t, cap_feats[:b], cap_mask[:b])
      return v.astype(jnp.float32)  # the solver state is fp32 whatever the compute dtype
  else:
    def model_fn(x2, t2):
      return model.apply({"params": params}, x2, t2, cap_feats, cap_mask)

    velocity = sampling.guided_velocity(model_fn, settings.cfg_mode, cfg_scale, settings.renorm)
  return sampling.sample(velocity, noise, solver=settings.solver, steps=settings.steps,
                         shift=settings.shift)


class Generator:
  """DiT params + text encoder + decoder -> uint8 images.

  dit_params: plain fp32 Flax params of `NextDiT(dit_cfg)`.
  text_encoder: a `text.TextEncoder` (its system prompt is used for non-empty prompts), or any
    object with `tokenize(captions, pad_to)`, `encode_tokens(ids, mask)` and `cfg.hidden_size`.
  autoencoder: an `SVGAutoencoder` with a decoder.
  mesh: split each batch over the mesh's batch axes (weights replicated); None = default device.
  """

  def __init__(self, dit_cfg: NextDiTConfig, dit_params: Any, text_encoder: Any,
               autoencoder: ae_lib.SVGAutoencoder, *, mesh: Mesh | None = None,
               pad_multiple: int = text.PAD_MULTIPLE, checkpoint_step: int | None = None,
               text_settings: dict | None = None):
    dit_cfg.validate()
    problems = []
    if autoencoder.decoder_params is None:
      problems.append("the autoencoder has no decoder")
    if autoencoder.stats.dim != dit_cfg.in_channels:
      problems.append(f"latent statistics have {autoencoder.stats.dim} channels, the DiT "
                      f"in_channels is {dit_cfg.in_channels}")
    hidden = getattr(getattr(text_encoder, "cfg", None), "hidden_size", None)
    if hidden is not None and hidden != dit_cfg.cap_feat_dim:
      problems.append(f"the text encoder gives {hidden}-dim features, the DiT cap_feat_dim is "
                      f"{dit_cfg.cap_feat_dim}")
    if problems:
      raise InputError("Generator: " + "; ".join(problems))
    self.cfg, self.text_encoder, self.autoencoder, self.mesh = (dit_cfg, text_encoder,
                                                                autoencoder, mesh)
    self.pad_multiple = pad_multiple
    self.checkpoint_step = checkpoint_step  # the training step of the params, when known
    # The system_type and hidden_layer the text encoder was built with (for provenance).
    self.text_settings = dict(text_settings or {})
    self.model = NextDiT(dit_cfg)
    place = (jnp.asarray if mesh is None else
             lambda x: jax.device_put(x, parallel.replicated(mesh)))
    self.params = jax.tree.map(place, dit_params)
    self._programs: dict[SamplerSettings, Callable] = {}
    self._empty: dict[int, tuple[np.ndarray, np.ndarray]] = {}

  # ---- sizes

  @property
  def pixels_per_token(self) -> int:
    """Pixels per latent token along each side, times the DiT patch (the resolution multiple)."""
    return self.autoencoder.decoder_cfg.upsample_factor * self.cfg.patch_size

  def latent_shape(self, resolution) -> tuple[int, int, int]:
    """(height, width) pixels (or a 'WxH' string) -> the latent [h, w, C]."""
    h, w = parse_resolution(resolution, self.pixels_per_token)
    rows, cols = h // self.pixels_per_token, w // self.pixels_per_token
    _, max_rows, max_cols = self.cfg.axes_lens
    if rows > max_rows or cols > max_cols:  # positions past the RoPE table would be clamped
      raise InputError(f"resolution {w}x{h} is {cols}x{rows} tokens, more than the DiT's "
                       f"position table holds ({max_cols}x{max_rows}, model.axes_lens): at most "
                       f"{max_cols * self.pixels_per_token}x{max_rows * self.pixels_per_token}")
    f = self.autoencoder.decoder_cfg.upsample_factor
    return h // f, w // f, self.cfg.in_channels

  def batch_multiple(self) -> int:
    return 1 if self.mesh is None else parallel.batch_axis_size(self.mesh)

  # ---- text

  def text_length(self, prompts: Sequence[str]) -> int:
    """The padded caption length of `prompts`: the longest, rounded up to pad_multiple."""
    return padded_text_length(self.text_encoder, prompts, self.pad_multiple)

  def _uncond(self, length: int) -> tuple[np.ndarray, np.ndarray]:
    if length not in self._empty:
      self._empty[length] = encode_prompts(self.text_encoder, [text.UNCONDITIONAL], length)
    return self._empty[length]

  def text_features(self, prompts: Sequence[str], length: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """[cond rows; uncond rows] features [2B, L, D] fp32 and mask [2B, L] for B prompts."""
    feats, mask = encode_prompts(self.text_encoder, prompts, length)
    return guided_rows(feats, mask, *self._uncond(length))

  # ---- sampling

  def _program(self, settings: SamplerSettings) -> Callable:
    key = dataclasses.replace(settings, cfg_scale=0.0)  # the scale is a traced argument
    if key not in self._programs:
      # On a mesh the latents come out whole on every device: on several hosts, each host then
      # holds them all (the gather is part of the program, compiled ahead with it).
      out = {} if self.mesh is None else dict(out_shardings=parallel.replicated(self.mesh))
      self._programs[key] = jax.jit(functools.partial(trajectory, model=self.model,
                                                      settings=key), **out)
    return self._programs[key]

  def _put(self, x: np.ndarray) -> jax.Array:
    # A mesh may span hosts, as in-training validation's does.
    return jnp.asarray(x) if self.mesh is None else parallel.split_host_array(x, self.mesh)

  def noise(self, seeds: Sequence[int], latent_shape: Sequence[int]) -> np.ndarray:
    """The initial noise of each seed: `sampling.initial_noise(seed, latent_shape)` rows."""
    return np.asarray(sampling.initial_noise_batch(np.asarray(seeds, np.int32), latent_shape))

  def latents(self, prompts: Sequence[str], seeds: Sequence[int], resolution,
              settings: SamplerSettings = SamplerSettings(), *, batch_size: int = 0,
              text_length: int | None = None,
              progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Sampled latents [N, h, w, C] fp32 (normalized latent space) for prompts[i] with seeds[i]."""
    n = len(prompts)
    out = []
    for start, z in self._latent_batches(prompts, seeds, resolution, settings, batch_size,
                                         text_length):
      out.append(z)
      if progress is not None:
        progress(start + len(z), n)
    return np.concatenate(out)

  def _latent_batches(self, prompts, seeds, resolution, settings: SamplerSettings,
                      batch_size: int, text_length: int | None
                      ) -> Iterator[tuple[int, np.ndarray]]:
    """(start, latents [k, h, w, C]) of each batch of `batch_size` prompts (rounded up to the
    batch split; 0: all in one), in order. The arguments are checked here, before the first
    batch is asked for."""
    prompts, seeds = _check_prompts_seeds(prompts, seeds)
    settings.validate()
    shape = self.latent_shape(resolution)
    n = len(prompts)
    length = self.text_length(prompts) if text_length is None else int(text_length)
    if length % self.pad_multiple:
      raise ValueError(f"text_length {length} is not a multiple of {self.pad_multiple}")
    chunk = round_up(batch_size if batch_size and batch_size > 0 else n, self.batch_multiple())

    def batches():
      for start in range(0, n, chunk):
        part_p, part_s = prompts[start:start + chunk], seeds[start:start + chunk]
        k = len(part_p)
        # Pad the last batch (empty prompts, seed 0) so every batch has one shape: one compile.
        part_p = part_p + [text.UNCONDITIONAL] * (chunk - k)
        part_s = part_s + [0] * (chunk - k)
        feats, mask = self.text_features(part_p, length)
        yield start, self.latents_from_features(feats, mask, part_s, shape, settings)[:k]

    return batches()

  def latents_from_features(self, feats: np.ndarray, mask: np.ndarray, seeds: Sequence[int],
                            latent_shape: Sequence[int],
                            settings: SamplerSettings = SamplerSettings()) -> np.ndarray:
    """One batch of B images: [cond rows; uncond rows] features [2B, L, D] and mask [2B, L] (as
    `text_features` gives them) and B seeds -> latents [B, h, w, C] fp32 on every process. B must
    be a multiple of `batch_multiple()`; one program per shape and sampler settings."""
    return parallel.replicated_to_host(self._program(settings)(
        *self._trajectory_args(feats, mask, seeds, latent_shape, settings)))

  def compile_latents(self, feats: np.ndarray, mask: np.ndarray, seeds: Sequence[int],
                      latent_shape: Sequence[int],
                      settings: SamplerSettings = SamplerSettings()) -> None:
    """Compiles ahead the program `latents_from_features` runs on these arguments (jit keeps it),
    so that call compiles nothing."""
    self._program(settings).lower(*self._trajectory_args(feats, mask, seeds, latent_shape,
                                                         settings)).compile()

  def _trajectory_args(self, feats, mask, seeds, latent_shape, settings) -> tuple:
    if feats.shape[0] != 2 * len(seeds) or len(seeds) % self.batch_multiple():
      raise ValueError(f"{feats.shape[0]} feature rows for {len(seeds)} seeds (need 2 per seed, "
                       f"seeds a multiple of {self.batch_multiple()})")
    noise = self.noise(seeds, latent_shape)
    return (self.params, self._put(noise), self._put(feats), self._put(mask),
            jnp.float32(settings.cfg_scale))

  def decode(self, latents: np.ndarray, batch_size: int = 0) -> np.ndarray:
    """Latents -> uint8 images [N, H, W, 3], converted as the official samplers do (their
    benchmark images included); `batch_size` images per decoder call unless the config's
    `autoencoder.batch_size` says otherwise (0: all at once)."""
    return ae_lib.to_uint8(self.autoencoder.decode(latents, batch_size), truncate=True)

  def image_batches(self, prompts: Sequence[str], seeds: Sequence[int], resolution,
                    settings: SamplerSettings = SamplerSettings(), *, batch_size: int = 0,
                    text_length: int | None = None,
                    progress: Callable[[int, int], None] | None = None
                    ) -> Iterator[tuple[range, np.ndarray]]:
    """(indices, uint8 images [k, H, W, 3]) per batch of `batch_size` prompts, in order: image b
    is prompts[indices[b]] from the noise of seeds[indices[b]], sampled and then decoded before
    the next batch is sampled. A caller writes each batch as it comes: memory holds one batch's
    latents and images, not the whole list's (20 GB for 1000 prompts at 1024 px), and an
    interrupted run keeps what was done. The decoder's calls are those of
    `decode(latents(...), batch_size)` (unless the autoencoder's own batch size cuts them
    elsewhere), so are the bytes. Bad arguments raise here, not at the first batch."""
    n = len(prompts)
    batches = self._latent_batches(prompts, seeds, resolution, settings, batch_size, text_length)

    def decoded():
      for start, z in batches:
        images = self.decode(z, batch_size)
        if progress is not None:
          progress(start + len(z), n)
        yield range(start, start + len(z)), images

    return decoded()

  def generate(self, prompts: Sequence[str], seeds: Sequence[int], resolution,
               settings: SamplerSettings = SamplerSettings(), *, batch_size: int = 0,
               text_length: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """uint8 images [N, H, W, 3] of prompts[i] from the noise of seeds[i]; decoded
    `batch_size` at a time as they are sampled (`image_batches`: a 1024 px image takes 1.5 GiB of
    decoder temporaries, all of a long prompt list at once would not fit)."""
    parts = [images for _, images in self.image_batches(
        prompts, seeds, resolution, settings, batch_size=batch_size, text_length=text_length,
        progress=progress)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)

  # ---- loading

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, *, text_encoder: str,
                  tokenizer: str | None = None, system_type: str | None = None,
                  hidden_layer: int | None = None,
                  checkpoint: str | None = None, ema: bool = True, step: int | None = None,
                  weights: str | None = None, weights_format: str | None = None,
                  mesh: Mesh | None = None) -> "Generator":
    """Build from `config` (its `model` and `autoencoder` sections) and local files.

    DiT weights: exactly one of `checkpoint` (a training workdir; its saved `model` section
    replaces config.model, EMA or raw params) and `weights` + `weights_format`
    (flax | official | safetensors | diffusers, laid out for config.model).
    Text: `system_type` and `hidden_layer` (None: the run's, see `text_settings`).
    """
    if (checkpoint is None) == (weights is None):
      raise InputError("give exactly one of a training checkpoint (--checkpoint) and converted "
                       "weights (--weights with --format)")
    if checkpoint is not None:
      step = dit_checkpoint.checkpoint_step(checkpoint, step)  # one step for config and params
      dit_cfg = dit_checkpoint.saved_model_config(checkpoint, step, config)
      params = dit_checkpoint.load_params(checkpoint, dit_cfg, ema=ema, step=step, mesh=mesh)
    else:
      if not weights_format:
        raise InputError("--weights needs --format (flax | official | safetensors | diffusers)")
      dit_cfg = config_lib.nextdit_config(config)
      params = dit_io.load_dit(weights, weights_format, dit_cfg)
    run = (dit_checkpoint.saved_text_conditioning(checkpoint, step) if checkpoint is not None
           else {})
    system_type, hidden_layer, warnings = text_settings(run, system_type, hidden_layer)
    for line in warnings:
      logging.warning("%s", line)
    enc = text.TextEncoder.from_pretrained(text_encoder, tokenizer, hidden_layer=hidden_layer,
                                           system_prompt=text.system_prompt(system_type),
                                           max_length=text.SAMPLE_MAX_LENGTH)
    ae = ae_lib.SVGAutoencoder.from_config(config, encoder=False, decoder=True, mesh=mesh)
    return cls(dit_cfg, params, enc, ae, mesh=mesh,
               checkpoint_step=step if checkpoint is not None else None,
               text_settings=dict(system_type=system_type, hidden_layer=hidden_layer))


def text_settings(run: dict, system_type: str | None, hidden_layer: int | None
                  ) -> tuple[str, int, list[str]]:
  """(system_type, hidden_layer, warnings) a sampler encodes its prompts with. A value given
  wins; None takes the training run's (`run`: `dit_checkpoint.saved_text_conditioning`), else the
  official `base` and -2. A run whose records used the system prompt rule "auto" (base for plain
  captions, align for `super_high_quality_caption` items) samples with base. A given value unlike
  the run's is a warning: the DiT never saw prompts encoded so."""
  warnings = []
  saved = run.get("system_prompt")
  run_type = saved if saved in text.SYSTEM_PROMPTS else None
  if system_type is None:
    system_type = run_type or "base"
  elif run_type is not None and system_type != run_type:
    warnings.append(f"--system_type {system_type}: the run trained on captions with the "
                    f"{run_type!r} system prompt")
  run_layer = run.get("hidden_layer")
  if hidden_layer is None:
    hidden_layer = -2 if run_layer is None else int(run_layer)
  elif run_layer is not None and int(hidden_layer) != int(run_layer):
    warnings.append(f"--hidden_layer {hidden_layer}: the run trained on Gemma-2's hidden state "
                    f"{int(run_layer)}")
  return system_type, int(hidden_layer), warnings


def padded_text_length(text_encoder: Any, prompts: Sequence[str], pad_multiple: int) -> int:
  """The one caption length a batch of `prompts` is padded to: the longest (with the encoder's
  system prompt), rounded up to `pad_multiple`."""
  _, mask = text_encoder.tokenize(list(prompts))
  return round_up(int(mask.sum(axis=1).max()), pad_multiple)


def encode_prompts(text_encoder: Any, prompts: Sequence[str], length: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Features [B, L, D] fp32 and mask [B, L] of prompts padded to `length` tokens (the encoder
  adds its system prompt to non-empty prompts)."""
  ids, mask = text_encoder.tokenize(list(prompts), pad_to=length)
  feats, _ = text_encoder.encode_tokens(ids, mask)
  return np.asarray(feats, np.float32), np.asarray(mask, bool)


def guided_rows(feats: np.ndarray, mask: np.ndarray, uncond_feats: np.ndarray,
                uncond_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """B prompts' features / mask and the empty prompt's [1, L, ...] -> the trajectory's
  [cond rows; uncond rows] layout [2B, L, ...]."""
  b = feats.shape[0]
  return (np.concatenate([feats, np.repeat(uncond_feats, b, axis=0)]),
          np.concatenate([mask, np.repeat(uncond_mask, b, axis=0)]))


def _check_prompts_seeds(prompts, seeds) -> tuple[list[str], list[int]]:
  if isinstance(prompts, str):
    raise TypeError("prompts must be a sequence of str, got a single str")
  prompts, seeds = list(prompts), [int(s) for s in seeds]
  if not prompts:
    raise ValueError("no prompts to generate")
  if len(prompts) != len(seeds):
    raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
  bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
  if bad:
    raise TypeError(f"prompts {bad[:5]} are not strings")
  out_of_range = [s for s in seeds if not 0 <= s < 2 ** 31]
  if out_of_range:
    raise ValueError(f"seeds must lie in [0, 2^31), got {out_of_range[:5]}")
  return prompts, seeds
