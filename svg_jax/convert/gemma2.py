"""Hugging Face Gemma-2 safetensors / config.json <-> params of `models.gemma2.Gemma2Encoder`.

The one key map for Gemma-2, used by the importer, the exporter and the parity tests alike. HF keys
come as Gemma2Model saves them (`embed_tokens.weight`, `layers.N...`, `norm.weight`) or as
Gemma2ForCausalLM does (the same under `model.`); `lm_head.weight` is accepted only when it equals
the embedding (tied, as in every released Gemma-2). Linear weights `[out, in]` <-> kernels
`[in, out]`; embedding and norm weights keep their layout. By default the HF keys must be exactly
the full model's: anything missing, unexpected or mis-shaped is listed in one ValueError.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from svg_jax.convert import layouts, safetensors_io
from svg_jax.input_errors import MissingInput
from svg_jax.models.gemma2 import LAYER_TYPES, Gemma2Config

_CAUSAL_LM_PREFIX = "model."
_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")


def _linear_shapes(cfg: Gemma2Config) -> dict[str, tuple[str, str, tuple[int, int]]]:
  """HF projection name -> (our module, our leaf module, torch [out, in] shape)."""
  h, q, kv, ff = (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                  cfg.intermediate_size)
  return {
      "self_attn.q_proj": ("self_attn", "q_proj", (q, h)),
      "self_attn.k_proj": ("self_attn", "k_proj", (kv, h)),
      "self_attn.v_proj": ("self_attn", "v_proj", (kv, h)),
      "self_attn.o_proj": ("self_attn", "o_proj", (h, q)),
      "mlp.gate_proj": ("mlp", "gate_proj", (ff, h)),
      "mlp.up_proj": ("mlp", "up_proj", (ff, h)),
      "mlp.down_proj": ("mlp", "down_proj", (h, ff)),
  }


def key_map(cfg: Gemma2Config, layer_indices: range | None = None, final_norm: bool = True
            ) -> list[tuple[str, tuple[str, ...], tuple[int, ...], bool]]:
  """Entries (HF key without prefix, our param path, HF shape, transpose?) for the given layers."""
  layer_indices = range(cfg.num_layers) if layer_indices is None else layer_indices
  h = cfg.hidden_size
  entries = [("embed_tokens.weight", ("embed_tokens",), (cfg.vocab_size, h), False)]
  for i in layer_indices:
    for hf_name, (group, leaf, shape) in _linear_shapes(cfg).items():
      entries.append((f"layers.{i}.{hf_name}.weight", (f"layers_{i}", group, leaf, "kernel"),
                      shape, True))
    for norm in _LAYER_NORMS:
      entries.append((f"layers.{i}.{norm}.weight", (f"layers_{i}", norm, "weight"), (h,), False))
  if final_norm:
    entries.append(("norm.weight", ("norm", "weight"), (h,), False))
  return entries


def _strip_prefix(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Drop Gemma2ForCausalLM's `model.` prefix; mixing prefixed and bare keys is an error."""
  prefixed = [k for k in flat if k.startswith(_CAUSAL_LM_PREFIX)]
  bare = [k for k in flat if not k.startswith(_CAUSAL_LM_PREFIX) and k != "lm_head.weight"]
  if prefixed and bare:
    raise ValueError(
        f"Gemma-2 checkpoint mixes '{_CAUSAL_LM_PREFIX}'-prefixed keys (e.g. {prefixed[:3]}) with "
        f"bare keys {sorted(bare)[:20]}")
  if not prefixed:
    return dict(flat)
  out = {k[len(_CAUSAL_LM_PREFIX):]: v for k, v in flat.items() if k != "lm_head.weight"}
  if "lm_head.weight" in flat:
    out["lm_head.weight"] = flat["lm_head.weight"]
  return out


def _unused_key(key: str, cfg: Gemma2Config) -> bool:
  """Whether `key` belongs to a layer (or the final norm) past the configured hidden state."""
  if key == "norm.weight":
    return not cfg.uses_final_norm
  parts = key.split(".")
  if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit():
    return cfg.layers_needed <= int(parts[1]) < cfg.num_layers
  return False


def hf_to_params(flat: Mapping[str, Any], cfg: Gemma2Config, *, only_needed: bool = False
                 ) -> dict[str, Any]:
  """HF Gemma-2 state dict (numpy-convertible values) -> our `params` collection, fp32 numpy.

  With only_needed=False (default) the keys must be exactly the full model's and every layer and the
  final norm are converted (a `hidden_layer=-2` model ignores the ones it does not run; export needs
  them). With only_needed=True, keys of layers past the configured hidden state (and the final norm
  when unused) may be absent and are dropped if present; every other key must still match.
  """
  flat = _strip_prefix(flat)
  problems = []
  if "lm_head.weight" in flat:
    head = np.asarray(flat.pop("lm_head.weight"))
    emb = flat.get("embed_tokens.weight")
    if emb is None or head.shape != np.shape(emb) or not np.array_equal(head, np.asarray(emb)):
      problems.append("lm_head.weight is present but not tied to embed_tokens.weight (an untied "
                      "LM head is not part of the encoder)")
  if only_needed:
    entries = key_map(cfg, range(cfg.layers_needed), cfg.uses_final_norm)
    flat = {k: v for k, v in flat.items() if not _unused_key(k, cfg)}
  else:
    entries = key_map(cfg)
  expected = {e[0] for e in entries}
  missing = sorted(expected - set(flat))
  unexpected = sorted(set(flat) - expected)
  if missing:
    problems.append(f"missing keys {missing}")
  if unexpected:
    problems.append(f"unexpected keys {unexpected}")
  params: dict[str, Any] = {}
  for key, path, shape, transpose in entries:
    if key not in flat:
      continue
    value = np.asarray(flat[key])
    if value.shape != shape:
      problems.append(f"{key}: shape {value.shape}, expected {shape}")
      continue
    value = layouts.to_flax("linear", value) if transpose else value
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.ascontiguousarray(value.astype(np.float32))
  if problems:
    raise ValueError("Gemma-2 checkpoint does not match the config: " + "; ".join(problems))
  return params


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for name, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flatten(value, prefix + (name,)))
    else:
      out[prefix + (name,)] = value
  return out


def params_to_hf(params: Mapping[str, Any], cfg: Gemma2Config, *, prefix: str = "",
                 dtype: Any = None) -> dict[str, np.ndarray]:
  """Our full `params` collection -> HF Gemma-2 state dict (numpy).

  prefix: "" gives Gemma2Model keys, "model." Gemma2ForCausalLM's (its tied lm_head is not written,
  as save_pretrained does not write it). dtype: output dtype (default: that of the params).
  The params must hold every layer and the final norm (a tree from `hf_to_params`, not the
  truncated tree a `hidden_layer=-2` model initializes).
  """
  import flax.linen as nn  # local: conversion of host arrays should not need flax elsewhere

  params = nn.unbox(params)
  if set(params) == {"params"}:
    params = params["params"]
  leaves = _flatten(params)
  entries = key_map(cfg)
  by_path = {e[1]: e for e in entries}
  missing = sorted(".".join(p) for p in set(by_path) - set(leaves))
  unexpected = sorted(".".join(p) for p in set(leaves) - set(by_path))
  problems = []
  if missing:
    problems.append(f"missing params {missing}")
  if unexpected:
    problems.append(f"unexpected params {unexpected}")
  flat = {}
  for path, value in leaves.items():
    if path not in by_path:
      continue
    key, _, shape, transpose = by_path[path]
    value = np.asarray(value)
    value = layouts.to_torch("linear", value) if transpose else value
    if value.shape != shape:
      problems.append(f"{'.'.join(path)}: gives {key} of shape {value.shape}, expected {shape}")
      continue
    if dtype is not None:
      value = value.astype(dtype)
    flat[prefix + key] = np.ascontiguousarray(value)
  if problems:
    raise ValueError("Gemma-2 params do not match the config: " + "; ".join(problems))
  return flat


def load_gemma2(path: str, cfg: Gemma2Config, *, only_needed: bool = False) -> dict[str, Any]:
  """Read a `model.safetensors` file, or a folder holding one or a sharded
  `model.safetensors.index.json` checkpoint, and convert it with `hf_to_params`."""
  if os.path.isdir(path):
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if not (os.path.exists(index) or os.path.exists(single)):
      raise MissingInput(
          f"{path} holds neither model.safetensors.index.json nor model.safetensors")
  elif not os.path.isfile(path):
    raise MissingInput(f"Gemma-2 checkpoint {path} does not exist")
  if not os.path.isdir(path):
    flat = safetensors_io.load_safetensors(path)
  elif os.path.exists(index):
    flat = safetensors_io.load_sharded_safetensors(path)
  else:
    flat = safetensors_io.load_safetensors(single)
  return hf_to_params(flat, cfg, only_needed=only_needed)


def config_from_hf_json(path: str, **overrides: Any) -> Gemma2Config:
  """Gemma2Config from a Hugging Face config.json (or a folder holding one).

  Reads both transformers 4 (`rope_theta`, no `layer_types`) and transformers 5 (`rope_parameters`,
  `layer_types`) files; fields the file omits take transformers' Gemma2Config defaults, which are
  ours. `overrides` set our own fields (hidden_layer, compute_dtype, attention_backend).
  Features the encoder does not implement are refused, not ignored.
  """
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.isfile(path):
    raise MissingInput(f"Gemma-2 config {path} does not exist (a model folder in the Hugging Face "
                       "layout holds config.json)")
  with open(path) as f:
    hf = json.load(f)
  problems = []
  if hf.get("model_type", "gemma2") != "gemma2":
    problems.append(f"model_type is {hf['model_type']!r}, not 'gemma2'")
  act = hf.get("hidden_activation", hf.get("hidden_act", "gelu_pytorch_tanh"))
  if act != "gelu_pytorch_tanh":
    problems.append(f"hidden activation {act!r} (only gelu_pytorch_tanh is implemented)")
  if hf.get("attention_bias"):
    problems.append("attention_bias=true (Gemma-2 projections have no bias here)")
  if hf.get("use_bidirectional_attention"):
    problems.append("use_bidirectional_attention=true (only causal attention is implemented)")
  rope = hf.get("rope_parameters") or {}
  if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
    problems.append(f"RoPE scaling {rope or hf.get('rope_scaling')} (only default RoPE)")
  theta = rope.get("rope_theta", hf.get("rope_theta", Gemma2Config.rope_theta))
  layer_types = hf.get("layer_types")
  if layer_types is not None:
    bad = sorted(set(layer_types) - set(LAYER_TYPES))
    if bad:
      problems.append(f"layer_types {bad} (only {LAYER_TYPES})")
  if problems:
    raise ValueError(f"unsupported Gemma-2 config {path}: " + "; ".join(problems))

  names = {  # ours -> HF
      "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
      "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
      "head_dim": "head_dim", "intermediate_size": "intermediate_size",
      "rms_norm_eps": "rms_norm_eps", "query_pre_attn_scalar": "query_pre_attn_scalar",
      "sliding_window": "sliding_window", "attn_logit_softcapping": "attn_logit_softcapping",
      "final_logit_softcapping": "final_logit_softcapping",
  }
  fields = {ours: hf[theirs] for ours, theirs in names.items() if theirs in hf}
  fields["rope_theta"] = float(theta)
  fields["layer_types"] = None if layer_types is None else tuple(layer_types)
  fields.update(overrides)
  cfg = Gemma2Config.from_dict(fields)
  cfg.validate()
  return cfg
