"""The offline demo's text encoder: a local tokenizer and a small Gemma-2, saved as HF files.

No Gemma weights can be downloaded where the demo runs, so `ensure_demo_text_encoder` creates, once
and deterministically from a seed, a folder laid out like a real Gemma-2 checkpoint:
- `tokenizer.model`: a sentencepiece BPE model trained here on the demo captions and the system
  prompts, with Gemma's conventions (ids 0-4 = <pad> <eos> <bos> <unk> <mask>, byte fallback so no
  text is ever <unk>, no dummy prefix, no normalization, digits split);
- `tokenizer.json` + `tokenizer_config.json`: that model converted by transformers into its
  `GemmaTokenizer` (<bos> added, no <eos>), so `text.load_tokenizer` reads it like a real one;
- `model.safetensors` + `config.json`: a Gemma-2-architecture model (vocab = tokenizer size) with
  random weights or with constructed ones whose features keep each word and the one before it
  (`DemoSpec.weights`), written through our own key map, so `convert.gemma2.load_gemma2` and
  `transformers.Gemma2Model.from_pretrained` both load it like real weights;
- `demo_text_encoder.json`: what was built (spec, seed, caption fingerprint), written last.
The folder is built in a temporary sibling and renamed into place, so it is complete or absent.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from svg_jax import text
from svg_jax.convert import gemma2 as convert
from svg_jax.convert.safetensors_io import save_safetensors
from svg_jax.models.gemma2 import Gemma2Config, Gemma2Encoder, abstract_params

MARKER = "demo_text_encoder.json"
FORMAT_VERSION = 1
WEIGHT_KINDS = ("random", "word_context")  # DemoSpec.weights
# Gemma's special-token layout.
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_PIECES = {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>"}
MASK_PIECE = "<mask>"


@dataclasses.dataclass(frozen=True)
class DemoSpec:
  """Sizes of the demo encoder. vocab_size is the target; the trained tokenizer may be smaller
  (BPE stops when no merge is left) and the model takes the tokenizer's actual size."""
  vocab_size: int = 512
  hidden_size: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  intermediate_size: int = 512
  sliding_window: int = 4096
  max_position_embeddings: int = 8192
  # Std of the random RMSNorm offsets (HF initializes them to 0, which would leave (1 + w) = 1).
  norm_std: float = 0.1
  # "random": HF's init (words blur together: research/caption_probe.py). "word_context":
  # constructed weights whose features are each token's word and the word before it.
  weights: str = "random"


def _fingerprint(captions: Sequence[str]) -> str:
  h = hashlib.sha256()
  for c in captions:
    h.update(c.encode("utf-8") + b"\0")
  return h.hexdigest()


def _corpus(captions: Sequence[str]) -> list[str]:
  """Sorted distinct captions plus every system prompt (so prompts tokenize compactly)."""
  bad = [c for c in captions if not isinstance(c, str)]
  if bad:
    raise TypeError(f"captions must be str, got {bad[:5]}")
  distinct = {c for c in captions if c}
  if not distinct:
    raise ValueError("no non-empty captions to train the demo tokenizer on")
  return sorted(distinct | {p for p in text.SYSTEM_PROMPTS.values() if p})


def train_sentencepiece(captions: Sequence[str], vocab_size: int) -> bytes:
  """Serialized sentencepiece BPE model trained on the captions (deterministic: one thread)."""
  import sentencepiece as spm

  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_corpus(captions)), model_writer=buf, model_type="bpe",
      vocab_size=vocab_size, hard_vocab_limit=False, character_coverage=1.0,
      pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
      pad_piece=SPECIAL_PIECES["pad"], eos_piece=SPECIAL_PIECES["eos"],
      bos_piece=SPECIAL_PIECES["bos"], unk_piece=SPECIAL_PIECES["unk"],
      control_symbols=[MASK_PIECE], byte_fallback=True, add_dummy_prefix=False,
      normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
      num_threads=1, minloglevel=2)
  return buf.getvalue()


def write_demo_tokenizer(folder: str, captions: Sequence[str], vocab_size: int = 512) -> int:
  """Trains the tokenizer and writes tokenizer.model / .json / _config.json into `folder`.

  Returns the vocabulary size.
  """
  import transformers

  os.makedirs(folder, exist_ok=True)
  sp_path = os.path.join(folder, "tokenizer.model")
  with open(sp_path, "wb") as f:
    f.write(train_sentencepiece(captions, vocab_size))
  # transformers converts the sentencepiece model itself (the same conversion real Gemma
  # folders went through); converting from a scratch folder keeps its path out of the config.
  with tempfile.TemporaryDirectory() as scratch:
    shutil.copy(sp_path, os.path.join(scratch, "tokenizer.model"))
    tok = transformers.GemmaTokenizer.from_pretrained(
        scratch, local_files_only=True, add_bos_token=True, add_eos_token=False)
    tok.save_pretrained(folder)
  config_path = os.path.join(folder, "tokenizer_config.json")
  with open(config_path) as f:
    config = json.load(f)
  # Drop entries that describe this build (the scratch path), not the tokenizer; state the
  # <bos>/<eos> rule explicitly, as Gemma's own tokenizer_config.json does.
  for key in ("vocab_file", "is_local", "local_files_only"):
    config.pop(key, None)
  config.update(add_bos_token=True, add_eos_token=False)
  with open(config_path, "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  ids = (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id)
  if ids != (PAD_ID, EOS_ID, BOS_ID, UNK_ID):
    raise RuntimeError(f"converted tokenizer has (pad, eos, bos, unk) ids {ids}, expected "
                       f"{(PAD_ID, EOS_ID, BOS_ID, UNK_ID)}")
  return len(tok)


def model_config(spec: DemoSpec, vocab_size: int) -> Gemma2Config:
  """Our config of the demo model with every layer and the final norm (as a checkpoint holds)."""
  return Gemma2Config(
      vocab_size=vocab_size, hidden_size=spec.hidden_size, num_layers=spec.num_layers,
      num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
      intermediate_size=spec.intermediate_size, query_pre_attn_scalar=float(spec.head_dim),
      sliding_window=spec.sliding_window, hidden_layer=-1)


def hf_config_json(cfg: Gemma2Config, spec: DemoSpec) -> dict:
  """config.json as transformers writes it for Gemma2Model (readable by transformers 4 and 5)."""
  return {
      "architectures": ["Gemma2Model"], "model_type": "gemma2",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_activation": "gelu_pytorch_tanh",
      "hidden_act": "gelu_pytorch_tanh", "max_position_embeddings": spec.max_position_embeddings,
      "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
      # An int, as in gemma-2-2b's file (transformers 5 validates the type).
      "query_pre_attn_scalar": int(cfg.query_pre_attn_scalar), "sliding_window": cfg.sliding_window,
      "attn_logit_softcapping": cfg.attn_logit_softcapping,
      "final_logit_softcapping": cfg.final_logit_softcapping, "attention_bias": False,
      "attention_dropout": 0.0, "initializer_range": 0.02, "tie_word_embeddings": True,
      "pad_token_id": PAD_ID, "eos_token_id": EOS_ID, "bos_token_id": BOS_ID,
      "torch_dtype": "float32", "use_cache": True,
  }


def random_params(cfg: Gemma2Config, seed: int, norm_std: float) -> dict:
  """Gemma2Encoder's init (HF's: normal(0.02), zero norm offsets) plus random norm offsets."""
  variables = jax.jit(lambda k: Gemma2Encoder(cfg).init(
      k, jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32)))(jax.random.key(seed))
  params = jax.tree_util.tree_map(np.asarray, nn.unbox(jax.device_get(variables["params"])))
  rng = np.random.default_rng([int(seed), 1])

  def offsets(path, leaf):
    if path[-1].key == "weight":  # only RMSNorms have a leaf named `weight`
      return (norm_std * rng.standard_normal(leaf.shape)).astype(np.float32)
    return np.asarray(leaf, np.float32)

  return jax.tree_util.tree_map_with_path(offsets, params)


def _previous_token_kernel(freqs: np.ndarray, head_dim: int, max_len: int) -> np.ndarray:
  """Weights over the RoPE frequency pairs whose summed cosines peak at a relative offset of one
  token: the largest margin over every other offset up to `max_len` (a small linear program)."""
  from scipy.optimize import linprog

  # Offsets from the previous token: -1 is the token itself, larger ones reach further back.
  others = np.array([d for d in range(-1, max_len) if d != 0])
  n = len(freqs)
  gap = 1.0 - np.cos(np.outer(others, freqs))  # peak minus the score at each other offset
  res = linprog(np.r_[np.zeros(n), -1.0], A_ub=np.hstack([-gap, np.ones((len(others), 1))]),
                b_ub=np.zeros(len(others)), A_eq=np.r_[np.ones(n), 0.0][None],
                b_eq=[1.0], bounds=[(0, None)] * n + [(None, None)])
  if res.status != 0 or -res.fun <= 0:
    raise RuntimeError(f"no previous-token kernel for head_dim {head_dim}: {res.message}")
  return res.x[:n]


def word_context_params(cfg: Gemma2Config, seed: int, max_len: int = 128) -> dict:
  """Constructed weights: features [word of the token, a constant, word of the token before it].

  The first half of the residual holds a random unit word vector and a constant channel; layer 0
  has one previous-token head per KV head (query and key read only the constant channel, so the
  score is positional: RoPE's cosines weighted to peak one token back) whose values copy the
  word half into the second half. Every other block writes zero. What the random init blurs
  (caption_probe: 0.43 held-out with 4-head readers), these keep: each word and its neighbour.
  The head looks one token back in sequences of up to `max_len` tokens (demo captions have under
  20, with a system prompt under 50).
  """
  h, hd = cfg.hidden_size, cfg.head_dim
  half = h // 2
  group = cfg.num_heads // cfg.num_kv_heads
  if cfg.num_kv_heads * hd != half or cfg.num_heads % cfg.num_kv_heads:
    raise ValueError(f"word_context weights need num_kv_heads x head_dim = hidden_size / 2 "
                     f"({cfg.num_kv_heads} x {hd} != {half})")
  params = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, np.float32),
                                  abstract_params(cfg))
  rng = np.random.default_rng([int(seed), 2])
  words = rng.standard_normal((cfg.vocab_size, half - 1))
  words /= np.linalg.norm(words, axis=1, keepdims=True)
  const = half - 1  # the constant channel
  emb = np.zeros((cfg.vocab_size, h))
  emb[:, :const], emb[:, const] = words, 1.0
  params["embed_tokens"] = (emb / np.sqrt(h)).astype(np.float32)  # Gemma scales by sqrt(h)

  # After input_layernorm every token's constant channel is sqrt(h / 2) (the half has norm sqrt(2)).
  unit = np.sqrt(h / 2.0)
  freqs = cfg.rope_theta ** (-np.arange(0, hd, 2) / hd)  # RoPE's, as gemma2.rope_cos_sin
  weights = _previous_token_kernel(freqs, hd, max_len)
  # Raw peak score 55 (x query scale) sits where the soft cap at 50 still separates it from the
  # runner-up (69% of the peak within 128 tokens) by ~8 nats.
  peak = 55.0 * np.sqrt(cfg.query_pre_attn_scalar)
  qv, kv = np.zeros(hd), np.zeros(hd)
  qv[:hd // 2] = weights * peak / unit ** 2
  kv[:hd // 2], kv[hd // 2:] = np.cos(freqs), np.sin(freqs)  # rotated back by one position
  attn = params["layers_0"]["self_attn"]
  v = np.zeros((h, cfg.num_kv_heads * hd))
  o = np.zeros((cfg.num_heads * hd, h))
  q = np.zeros((h, cfg.num_heads * hd))
  k = np.zeros((h, cfg.num_kv_heads * hd))
  for kv_head in range(cfg.num_kv_heads):
    head = kv_head * group  # the first query head of this KV group
    q[const, head * hd:(head + 1) * hd] = qv
    k[const, kv_head * hd:(kv_head + 1) * hd] = kv
    rows = slice(kv_head * hd, (kv_head + 1) * hd)
    v[rows, kv_head * hd:(kv_head + 1) * hd] = np.eye(hd)
    o[head * hd:(head + 1) * hd, half + kv_head * hd:half + (kv_head + 1) * hd] = np.eye(hd)
  attn["q_proj"]["kernel"], attn["k_proj"]["kernel"] = q, k
  attn["v_proj"]["kernel"], attn["o_proj"]["kernel"] = v, o
  # The copy arrives normalized (the first half times `unit`); (1 + w) = 1 / unit gives both
  # halves of a feature the same scale.
  params["layers_0"]["post_attention_layernorm"]["weight"] = np.full(h, 1.0 / unit - 1.0)
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)


def _marker(spec: DemoSpec, seed: int, captions: Sequence[str]) -> dict:
  return {"format_version": FORMAT_VERSION, "seed": int(seed), "spec": dataclasses.asdict(spec),
          "captions_sha256": _fingerprint(_corpus(captions))}


def build(folder: str, captions: Sequence[str], seed: int, spec: DemoSpec = DemoSpec()) -> None:
  """Writes every file of the demo encoder into `folder` (the marker last)."""
  if spec.weights not in WEIGHT_KINDS:  # before the tokenizer is trained for nothing
    raise ValueError(f"unknown demo text encoder weights {spec.weights!r}; expected one of "
                     f"{WEIGHT_KINDS}")
  vocab = write_demo_tokenizer(folder, captions, spec.vocab_size)
  cfg = model_config(spec, vocab)
  params = (random_params(cfg, seed, spec.norm_std) if spec.weights == "random"
            else word_context_params(cfg, seed))
  flat = convert.params_to_hf(params, cfg)
  save_safetensors(os.path.join(folder, "model.safetensors"), flat, metadata={"format": "pt"})
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_config_json(cfg, spec), f, indent=2, sort_keys=True)
  with open(os.path.join(folder, MARKER), "w") as f:
    json.dump(_marker(spec, seed, captions), f, indent=2, sort_keys=True)


class BuiltDifferently(ValueError):
  """The folder holds a demo text encoder built from other captions, seed or spec."""


def _check_existing(folder: str, expected: dict) -> None:
  path = os.path.join(folder, MARKER)
  if not os.path.isfile(path):
    raise ValueError(f"{folder} exists but is not a demo text encoder (no {MARKER}); use another "
                     "folder or delete it")
  with open(path) as f:
    existing = json.load(f)
  if isinstance(existing.get("spec"), dict):
    # Markers written before the demo had constructed weights have no `weights`:
    # every encoder then had HF's random init.
    existing["spec"].setdefault("weights", "random")
  if existing != expected:
    diff = sorted(k for k in set(existing) | set(expected) if existing.get(k) != expected.get(k))
    raise BuiltDifferently(f"{folder} holds a demo text encoder built differently (differs in "
                           f"{diff}); use another folder or delete it")


def ensure_demo_text_encoder(folder: str, captions: Sequence[str], seed: int = 0,
                             spec: DemoSpec = DemoSpec()) -> str:
  """Creates the demo text encoder in `folder` unless it is already there; returns `folder`.

  Idempotent: an existing folder built from the same captions, seed and spec is reused, one built
  differently is an error. Atomic: built in a temporary sibling folder, then renamed.
  """
  folder = os.path.abspath(folder)
  expected = _marker(spec, seed, captions)
  if os.path.exists(folder):
    _check_existing(folder, expected)
    return folder
  parent = os.path.dirname(folder)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=parent)
  os.chmod(tmp, 0o755)  # mkdtemp's 0700 would otherwise survive the rename
  try:
    build(tmp, captions, seed, spec)
    try:
      os.rename(tmp, folder)
    except OSError:
      if not os.path.exists(folder):
        raise
      _check_existing(folder, expected)  # another process finished first
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return folder
