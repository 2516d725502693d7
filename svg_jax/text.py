"""Text conditioning: tokenizer loading, the official system prompts, padding rules, text features.

Facts of the official SVG-T2I code (docs/reference.md §1.5) this module reproduces:
- A system prompt is glued in front of the caption with no separator. Training uses `base`, items
  carrying `super_high_quality_caption` use the "highest degree of image-text alignment" variant
  (the same string as the sampler's `align`); the sampler picks one by `--system_type`.
- The unconditional caption (training caption dropout, the sampler's negative prompt) is the empty
  string *without* a system prompt, which tokenizes to `<bos>` alone: one valid token.
- Gemma's tokenizer adds `<bos>`, truncates to max_length (256 in training because of an argument
  bug, 512 at sampling), pads on the right to the batch's longest, rounded up to a multiple of 8.
- The features are Gemma-2's `hidden_states[-2]` with the attention mask reused as caption mask.

Here "" always means the unconditional caption. (The official dataset turns an empty *data* caption
into the system prompt alone; our precompute reports empty captions as bad input instead.)
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from svg_jax.convert import gemma2 as convert
from svg_jax.input_errors import InputError, MissingInput
from svg_jax.models.gemma2 import Gemma2Config, Gemma2Encoder
from svg_jax.utils.rounding import round_up

# Sampling system prompts by `--system_type` (sample_svg_t2i.py); `base` is also training's.
SYSTEM_PROMPTS: dict[str, str] = {
    "base": ("You are an assistant designed to generate high-quality images based on user prompts. "
             "<Prompt Start> "),
    "align": ("You are an assistant designed to generate high-quality images with the highest "
              "degree of image-text alignment based on textual prompts. <Prompt Start> "),
    "aesthetics": ("You are an assistant designed to generate high-quality images with highest "
                   "degree of aesthetics based on user prompts. <Prompt Start> "),
    "real": ("You are an assistant designed to generate superior images with the superior degree "
             "of image-text alignment based on textual prompts or user prompts. <Prompt Start> "),
    "4grid": ("You are an assistant designed to generate four high-quality images with highest "
              "degree of aesthetics arranged in 2x2 grids based on user prompts. <Prompt Start> "),
    "empty": "",
}
BASE_SYSTEM_PROMPT = SYSTEM_PROMPTS["base"]
# Training items keyed `super_high_quality_caption` (train_svg_t2i.py) use this variant.
SUPER_HIGH_QUALITY_SYSTEM_PROMPT = SYSTEM_PROMPTS["align"]
SUPER_HIGH_QUALITY_KEY = "super_high_quality_caption"

# Max token lengths (system prompt and <bos> included): training's effective 256 (the official
# `--max_cap_len 512` never reaches the tokenizer), sampling's hard-coded 512.
TRAIN_MAX_LENGTH = 256
SAMPLE_MAX_LENGTH = 512
PAD_MULTIPLE = 8
UNCONDITIONAL = ""


def system_prompt(system_type: str) -> str:
  """The sampler's system prompt for `system_type` (base/align/aesthetics/real/4grid/empty)."""
  if system_type == "enhance":
    raise InputError("system_type 'enhance' rewrites the prompt with Gemma-2 as a causal LM before "
                     "encoding; that prompt rewriting is not implemented here. Use one of "
                     f"{sorted(SYSTEM_PROMPTS)}")
  if system_type not in SYSTEM_PROMPTS:
    raise InputError(f"unknown system_type {system_type!r}; expected one of "
                     f"{sorted(SYSTEM_PROMPTS)} ('enhance' is not implemented)")
  return SYSTEM_PROMPTS[system_type]


def training_caption(item: Mapping[str, Any]) -> tuple[str, str]:
  """(caption, system prompt) of an official training jsonl item.

  As train_svg_t2i.py: an item with `super_high_quality_caption` uses that caption and the
  alignment system prompt; otherwise `prompt` with the base system prompt.
  """
  if SUPER_HIGH_QUALITY_KEY in item:
    return item[SUPER_HIGH_QUALITY_KEY], SUPER_HIGH_QUALITY_SYSTEM_PROMPT
  if "prompt" in item:
    return item["prompt"], BASE_SYSTEM_PROMPT
  raise ValueError(f"item has neither {SUPER_HIGH_QUALITY_KEY!r} nor 'prompt' (keys: "
                   f"{sorted(item)})")


def with_system_prompt(caption: str, prompt: str) -> str:
  """`prompt + caption`, except that the unconditional "" stays "" (it encodes to <bos> only)."""
  if not isinstance(caption, str):
    raise TypeError(f"caption must be a str, got {type(caption).__name__}: {caption!r}")
  if not isinstance(prompt, str):
    raise TypeError(f"system prompt must be a str, got {type(prompt).__name__}")
  return caption if caption == UNCONDITIONAL else prompt + caption


def load_tokenizer(model_dir: str):
  """A Hugging Face tokenizer from a local folder (never the hub), padding on the right.

  Works for a real Gemma tokenizer folder and for the demo one (`svg_jax/demo/text_encoder.py`).
  The tokenizer must add <bos> by itself and have a pad token, as Gemma's does.
  """
  if not os.path.isdir(model_dir):
    raise MissingInput(f"tokenizer folder {model_dir} does not exist")
  import transformers  # local: only text I/O needs transformers

  try:
    tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
  except (OSError, ValueError) as e:
    raise InputError(f"{model_dir} is not a loadable tokenizer folder: {e}") from e
  tok.padding_side = "right"
  problems = []
  if tok.bos_token_id is None:
    problems.append("no bos token")
  if tok.pad_token_id is None:
    problems.append("no pad token")
  if not problems:
    empty = tok(UNCONDITIONAL)["input_ids"]
    if empty != [tok.bos_token_id]:
      problems.append(f"the empty string tokenizes to {empty}, not [<bos>={tok.bos_token_id}] "
                      "(the tokenizer must add <bos> and nothing else)")
  if problems:
    raise ValueError(f"tokenizer in {model_dir} is not Gemma-like: " + "; ".join(problems))
  return tok


def tokenize(tokenizer, captions: Sequence[str], system_prompt: str = BASE_SYSTEM_PROMPT,
             max_length: int = SAMPLE_MAX_LENGTH, *, pad_multiple: int = PAD_MULTIPLE,
             pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Captions -> (ids [B, L] int32, mask [B, L] bool), the official encode_prompt's tokenization.

  Each non-empty caption gets `system_prompt` in front; the tokenizer adds <bos>; sequences are
  truncated to `max_length` tokens (a multiple of `pad_multiple`, as transformers demands) and
  right-padded with the pad id to the longest in the batch rounded up to `pad_multiple` (as
  `padding=True, pad_to_multiple_of=8`). `pad_to` fixes L instead (static length buckets under
  jit); it must be >= the longest sequence.
  """
  if isinstance(captions, str):
    raise TypeError("captions must be a sequence of str, got a single str")
  captions = list(captions)
  if not captions:
    raise ValueError("tokenize needs at least one caption")
  if max_length < 1:
    raise ValueError(f"max_length must be >= 1, got {max_length}")
  if pad_multiple < 1:
    raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
  if max_length % pad_multiple:
    # transformers refuses this combination too: padding could exceed the truncation length.
    raise ValueError(f"max_length {max_length} is not a multiple of pad_multiple {pad_multiple}")
  texts = [with_system_prompt(c, system_prompt) for c in captions]
  seqs = tokenizer(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
  bos = tokenizer.bos_token_id
  no_bos = [i for i, s in enumerate(seqs) if not s or s[0] != bos]
  if no_bos:
    raise ValueError(f"captions {no_bos} do not start with <bos> ({bos}); load the tokenizer with "
                     "text.load_tokenizer (Gemma adds <bos>)")
  longest = max(len(s) for s in seqs)
  length = round_up(longest, pad_multiple)
  if pad_to is not None:
    if pad_to < longest:
      raise ValueError(f"pad_to={pad_to} is shorter than the longest tokenized caption ({longest} "
                       "tokens)")
    length = pad_to
  ids = np.full((len(seqs), length), tokenizer.pad_token_id, np.int32)
  mask = np.zeros((len(seqs), length), bool)
  for row, seq in enumerate(seqs):
    ids[row, :len(seq)] = seq
    mask[row, :len(seq)] = True
  return ids, mask


def token_counts(tokenizer, captions: Sequence[str], system_prompt: str = BASE_SYSTEM_PROMPT
                 ) -> np.ndarray:
  """Tokens of each caption as `tokenize` encodes it (<bos> and `system_prompt` included), before
  any truncation: int [B]. A count above `tokenize`'s max_length means the caption is cut there,
  which the official tokenization does silently; samplers use this to report it."""
  if isinstance(captions, str):
    raise TypeError("captions must be a sequence of str, got a single str")
  texts = [with_system_prompt(c, system_prompt) for c in captions]
  # verbose=False: no warning from transformers about captions over the tokenizer's own limit.
  seqs = tokenizer(texts, truncation=False, padding=False, verbose=False)["input_ids"]
  return np.array([len(s) for s in seqs], np.int64)


class TextEncoder:
  """Frozen Gemma-2 + tokenizer: captions -> (features [B, L, D], lengths [B]).

  Features are the configured hidden state (`hidden_states[-2]` by default), zero on padding, in
  `feature_dtype` (float32, or bfloat16 as records store them). The encoder is jitted once per
  padded length; `params` may already be placed/sharded by the caller. With `mesh` (params
  sharded over it, as a trainer places them: possibly over several hosts) the ids go to every
  device of the mesh and the features come back replicated, readable on every process.
  """

  def __init__(self, cfg: Gemma2Config, params: Any, tokenizer=None, *,
               system_prompt: str = BASE_SYSTEM_PROMPT, max_length: int = SAMPLE_MAX_LENGTH,
               feature_dtype: str = "float32", pad_multiple: int = PAD_MULTIPLE,
               mesh: Mesh | None = None):
    cfg.validate()
    if jnp.dtype(feature_dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
      raise ValueError(f"feature_dtype must be float32 or bfloat16, got {feature_dtype!r}")
    if tokenizer is not None and len(tokenizer) > cfg.vocab_size:
      raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size "
                       f"{cfg.vocab_size}")
    self.cfg = cfg
    self.params = jax.tree_util.tree_map(jnp.asarray, params)
    self.tokenizer = tokenizer
    self.system_prompt = system_prompt
    self.max_length = max_length
    self.feature_dtype = jnp.dtype(feature_dtype)
    self.pad_multiple = pad_multiple
    module = Gemma2Encoder(cfg)

    def encode(p, ids, mask):
      feats, lengths = module.apply({"params": p}, ids, mask)
      return feats.astype(self.feature_dtype), lengths

    self._replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    self._encode = (jax.jit(encode) if mesh is None else
                    jax.jit(encode, out_shardings=self._replicated))

  @classmethod
  def from_pretrained(cls, model_dir: str, tokenizer_dir: str | None = None, *,
                      hidden_layer: int = -2, compute_dtype: str = "float32", **kwargs
                      ) -> "TextEncoder":
    """Config, weights (only the layers needed) and tokenizer from local HF-format folders."""
    if not os.path.exists(model_dir):
      raise MissingInput(f"text encoder folder {model_dir} does not exist")
    try:
      cfg = convert.config_from_hf_json(model_dir, hidden_layer=hidden_layer,
                                        compute_dtype=compute_dtype)
    except ValueError as e:  # a config this encoder cannot run, or a layer it does not have
      raise InputError(f"text encoder {model_dir}: {e}") from None
    params = convert.load_gemma2(model_dir, cfg, only_needed=True)
    tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    return cls(cfg, params, tokenizer, **kwargs)

  def tokenize(self, captions: Sequence[str], pad_to: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    if self.tokenizer is None:
      raise ValueError("this TextEncoder has no tokenizer; call encode_tokens with token ids")
    return tokenize(self.tokenizer, captions, self.system_prompt, self.max_length,
                    pad_multiple=self.pad_multiple, pad_to=pad_to)

  def token_counts(self, captions: Sequence[str]) -> np.ndarray:
    """Each caption's tokens before truncation (`token_counts` with this encoder's tokenizer and
    system prompt): those above `max_length` are cut by `tokenize`."""
    if self.tokenizer is None:
      raise ValueError("this TextEncoder has no tokenizer")
    return token_counts(self.tokenizer, captions, self.system_prompt)

  def encode_tokens(self, ids: Any, mask: Any) -> tuple[jax.Array, jax.Array]:
    """(ids [B, L], mask [B, L]) -> (features [B, L, D], lengths [B] int32)."""
    ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool)
    if ids.ndim != 2 or ids.shape != mask.shape:
      raise ValueError(f"ids and mask must both be [B, L], got {ids.shape} and {mask.shape}")
    if self._replicated is not None:  # every process holds the same ids: each places its copy
      ids, mask = (jax.make_array_from_callback(x.shape, self._replicated,
                                                lambda index, x=np.asarray(x): x[index])
                   for x in (ids, mask))
    return self._encode(self.params, ids, mask)

  def __call__(self, captions: Sequence[str], pad_to: int | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """Captions (system prompt added to non-empty ones) -> (features, lengths)."""
    return self.encode_tokens(*self.tokenize(captions, pad_to))
