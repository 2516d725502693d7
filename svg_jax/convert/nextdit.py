"""The one key map of the NextDiT: our Flax params <-> official SVG-T2I state dict <-> diffusers.

Official layout: `consolidated.00-of-01.pth`, a flat dict (docs/reference.md §1.7). diffusers layout:
`Lumina2Transformer2DModel` (docs/equivalence/nextdit.md §3). The Flax tree keeps q/k/v as separate kernels
(tensor-parallel friendly); the official fused `qkv` weight is their row-wise concatenation [q | k | v].
Scanned layer stacks (`layers/block/...` with a leading layer axis) are split on export and stacked on
import. Every direction checks names and shapes and lists any missing, unexpected or mis-shaped key.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np

from svg_jax.convert import layouts, scan_layout
from svg_jax.convert.errors import KeyMismatchError
from svg_jax.models.nextdit import NextDiTConfig, abstract_params

# (official suffix, flax path inside a block, kind); kind "linear" = transpose [out,in] <-> [in,out].
_BLOCK = [
    ("attention.out.weight", ("attention", "out", "kernel"), "linear"),
    ("attention.q_norm.weight", ("attention", "q_norm", "weight"), "copy"),
    ("attention.k_norm.weight", ("attention", "k_norm", "weight"), "copy"),
    ("feed_forward.w1.weight", ("feed_forward", "w1", "kernel"), "linear"),
    ("feed_forward.w2.weight", ("feed_forward", "w2", "kernel"), "linear"),
    ("feed_forward.w3.weight", ("feed_forward", "w3", "kernel"), "linear"),
    ("attention_norm1.weight", ("attention_norm1", "weight"), "copy"),
    ("ffn_norm1.weight", ("ffn_norm1", "weight"), "copy"),
    ("attention_norm2.weight", ("attention_norm2", "weight"), "copy"),
    ("ffn_norm2.weight", ("ffn_norm2", "weight"), "copy"),
]
_ADALN = [
    ("adaLN_modulation.1.weight", ("adaLN_modulation", "kernel"), "linear"),
    ("adaLN_modulation.1.bias", ("adaLN_modulation", "bias"), "copy"),
]
_QKV = ("attention.qkv.weight", (("attention", "to_q", "kernel"), ("attention", "to_k", "kernel"),
                                 ("attention", "to_v", "kernel")))
_TOP = [
    ("x_embedder.weight", ("x_embedder", "kernel"), "linear"),
    ("x_embedder.bias", ("x_embedder", "bias"), "copy"),
    ("t_embedder.mlp.0.weight", ("t_embedder_0", "kernel"), "linear"),
    ("t_embedder.mlp.0.bias", ("t_embedder_0", "bias"), "copy"),
    ("t_embedder.mlp.2.weight", ("t_embedder_2", "kernel"), "linear"),
    ("t_embedder.mlp.2.bias", ("t_embedder_2", "bias"), "copy"),
    ("cap_embedder.0.weight", ("cap_embedder_norm", "weight"), "copy"),
    ("cap_embedder.1.weight", ("cap_embedder_linear", "kernel"), "linear"),
    ("cap_embedder.1.bias", ("cap_embedder_linear", "bias"), "copy"),
    ("norm_final.weight", ("norm_final",), "copy"),
    ("final_layer.linear.weight", ("final_linear", "kernel"), "linear"),
    ("final_layer.linear.bias", ("final_linear", "bias"), "copy"),
    ("final_layer.adaLN_modulation.1.weight", ("final_adaLN", "kernel"), "linear"),
    ("final_layer.adaLN_modulation.1.bias", ("final_adaLN", "bias"), "copy"),
]

# Official -> diffusers names (docs/equivalence/nextdit.md §3). Block keys use the `{B}.{i}.` prefix.
_DIFFUSERS_TOP = {
    "x_embedder.weight": "x_embedder.weight",
    "x_embedder.bias": "x_embedder.bias",
    "t_embedder.mlp.0.weight": "time_caption_embed.timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "time_caption_embed.timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "time_caption_embed.timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "time_caption_embed.timestep_embedder.linear_2.bias",
    "cap_embedder.0.weight": "time_caption_embed.caption_embedder.0.weight",
    "cap_embedder.1.weight": "time_caption_embed.caption_embedder.1.weight",
    "cap_embedder.1.bias": "time_caption_embed.caption_embedder.1.bias",
    "final_layer.linear.weight": "norm_out.linear_2.weight",
    "final_layer.linear.bias": "norm_out.linear_2.bias",
    "final_layer.adaLN_modulation.1.weight": "norm_out.linear_1.weight",
    "final_layer.adaLN_modulation.1.bias": "norm_out.linear_1.bias",
}
_DIFFUSERS_BLOCK = {
    "attention.out.weight": "attn.to_out.0.weight",
    "attention.q_norm.weight": "attn.norm_q.weight",
    "attention.k_norm.weight": "attn.norm_k.weight",
    "feed_forward.w1.weight": "feed_forward.linear_1.weight",
    "feed_forward.w2.weight": "feed_forward.linear_2.weight",
    "feed_forward.w3.weight": "feed_forward.linear_3.weight",
    "attention_norm2.weight": "norm2.weight",
    "ffn_norm1.weight": "ffn_norm1.weight",
    "ffn_norm2.weight": "ffn_norm2.weight",
}
_DIFFUSERS_MODULATED = {
    "attention_norm1.weight": "norm1.norm.weight",
    "adaLN_modulation.1.weight": "norm1.linear.weight",
    "adaLN_modulation.1.bias": "norm1.linear.bias",
}
_DIFFUSERS_UNMODULATED = {"attention_norm1.weight": "norm1.weight"}
_DIFFUSERS_QKV = ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight")


def _blocks(cfg: NextDiTConfig) -> Iterator[tuple[str, str, bool]]:
  """(official prefix, flax unscanned module name, modulated) for every block."""
  for i in range(cfg.n_refiner_layers):
    yield f"noise_refiner.{i}.", f"noise_refiner_{i}", True
  for i in range(cfg.n_refiner_layers):
    yield f"context_refiner.{i}.", f"context_refiner_{i}", False
  for i in range(cfg.n_layers):
    yield f"layers.{i}.", f"layers_{i}", True


def key_map(cfg: NextDiTConfig) -> list[tuple[str, tuple, str]]:
  """Every official key with its flax path(s) (unscanned layout) and transform kind."""
  entries = list(_TOP)
  for prefix, mod, modulated in _blocks(cfg):
    entries.append((prefix + _QKV[0], tuple((mod,) + p for p in _QKV[1]), "qkv"))
    for suffix, path, kind in _BLOCK + (_ADALN if modulated else []):
      entries.append((prefix + suffix, (mod,) + path, kind))
  return entries


def official_shapes(cfg: NextDiTConfig) -> dict[str, tuple[int, ...]]:
  """Official key -> shape, derived from the abstract (never allocated) Flax params."""
  flat = unscanned_flat(abstract_params(cfg))
  shapes = {}
  for key, path, kind in key_map(cfg):
    if kind == "qkv":
      ins = {flat[p].shape[0] for p in path}
      shapes[key] = (sum(flat[p].shape[1] for p in path), ins.pop())
    elif kind == "linear":
      shapes[key] = tuple(reversed(flat[path].shape))
    else:
      shapes[key] = tuple(flat[path].shape)
  return shapes


_STACK = ("layers", "block")


def unscanned_flat(params) -> dict[tuple, Any]:
  """Flatten params to {path: array}, a scanned `layers/block` stack split into `layers_{i}`."""
  return scan_layout.unscan(params, _STACK, "layers")


def rescan(flat: dict[tuple, np.ndarray], cfg: NextDiTConfig) -> dict:
  """Inverse of `unscanned_flat` for the model's layout (stack `layers_{i}` when scanning)."""
  return scan_layout.rescan(flat, _STACK, "layers", cfg.n_layers, cfg.scan_layers)


def official_to_params(state: dict[str, np.ndarray], cfg: NextDiTConfig) -> dict:
  """Official flat state dict (fp32 or bf16 arrays) -> Flax params (fp32) for `cfg`'s layout."""
  expected = official_shapes(cfg)
  missing = set(expected) - set(state)
  unexpected = set(state) - set(expected)
  misshaped = {f"{k} {tuple(np.shape(state[k]))} != {expected[k]}" for k in set(expected) & set(state)
               if tuple(np.shape(state[k])) != expected[k]}
  if missing or unexpected or misshaped:
    raise KeyMismatchError("official NextDiT state dict", missing, unexpected, misshaped)
  flat = {}
  for key, path, kind in key_map(cfg):
    w = np.asarray(state[key]).astype(np.float32)
    if kind == "qkv":
      sizes = np.cumsum([cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim])
      for p, part in zip(path, np.split(w, sizes, axis=0)):
        flat[p] = layouts.to_flax("linear", part)
    elif kind == "linear":
      flat[path] = layouts.to_flax("linear", w)
    else:
      flat[path] = w
  return rescan(flat, cfg)


def params_to_official(params, cfg: NextDiTConfig, dtype=np.float32) -> dict[str, np.ndarray]:
  """Flax params -> official flat state dict, in the official registration order of keys."""
  flat = {k: np.asarray(v) for k, v in unscanned_flat(params).items()}
  expected = {path for _, path, kind in key_map(cfg) if kind != "qkv"}
  expected |= {p for _, paths, kind in key_map(cfg) if kind == "qkv" for p in paths}
  missing = expected - set(flat)
  unexpected = set(flat) - expected
  if missing or unexpected:
    raise KeyMismatchError("Flax NextDiT params", ["/".join(p) for p in missing],
                           ["/".join(p) for p in unexpected])
  state = {}
  for key, path, kind in _official_order(cfg):
    if kind == "qkv":
      w = np.concatenate([layouts.to_torch("linear", flat[p]) for p in path], axis=0)
    elif kind == "linear":
      w = layouts.to_torch("linear", flat[path])
    else:
      w = flat[path]
    state[key] = np.ascontiguousarray(w).astype(dtype)
  return state


def _official_order(cfg: NextDiTConfig):
  """key_map entries in the official module registration order (docs/reference.md §1.7)."""
  entries = {k: (k, p, kind) for k, p, kind in key_map(cfg)}
  order = ["x_embedder.weight", "x_embedder.bias"]
  block_suffixes = [_QKV[0]] + [s for s, _, _ in _BLOCK]
  for prefix, _, modulated in _blocks(cfg):
    if prefix.startswith("layers."):
      continue
    order += [prefix + s for s in block_suffixes]
    if modulated:
      order += [prefix + s for s, _, _ in _ADALN]
  order += ["t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight",
            "t_embedder.mlp.2.bias", "cap_embedder.0.weight", "cap_embedder.1.weight",
            "cap_embedder.1.bias"]
  for i in range(cfg.n_layers):
    order += [f"layers.{i}." + s for s in block_suffixes] + [f"layers.{i}." + s for s, _, _ in _ADALN]
  order += ["norm_final.weight", "final_layer.linear.weight", "final_layer.linear.bias",
            "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"]
  return [entries[k] for k in order]


# ----------------------------------------------------------------------------------------------
# diffusers


def _diffusers_block_names(prefix: str, modulated: bool) -> dict[str, str]:
  names = dict(_DIFFUSERS_BLOCK)
  names.update(_DIFFUSERS_MODULATED if modulated else _DIFFUSERS_UNMODULATED)
  return {prefix + k: prefix + v for k, v in names.items()}


def official_to_diffusers(state: dict[str, np.ndarray], cfg: NextDiTConfig) -> dict[str, np.ndarray]:
  """Official state dict -> diffusers `Lumina2Transformer2DModel` state dict (drops norm_final)."""
  out = {}
  for key, value in state.items():
    if key == "norm_final.weight":
      continue
    if key in _DIFFUSERS_TOP:
      out[_DIFFUSERS_TOP[key]] = value
      continue
    prefix, suffix = _split_block_key(key, cfg)
    if suffix == _QKV[0]:
      sizes = np.cumsum([cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim])
      for name, part in zip(_DIFFUSERS_QKV, np.split(value, sizes, axis=0)):
        out[prefix + name] = np.ascontiguousarray(part)
    else:
      out[_diffusers_block_names(prefix, _is_modulated(prefix))[key]] = value
  return out


def diffusers_to_official(state: dict[str, np.ndarray], cfg: NextDiTConfig) -> dict[str, np.ndarray]:
  """diffusers state dict -> official state dict; `norm_final.weight` (unused) is written as ones."""
  reverse = {v: k for k, v in _DIFFUSERS_TOP.items()}
  qkv_parts: dict[str, dict[str, np.ndarray]] = {}
  out, unexpected = {}, []
  for prefix, _, modulated in _blocks(cfg):
    reverse.update({v: k for k, v in _diffusers_block_names(prefix, modulated).items()})
  for key, value in state.items():
    if key in reverse:
      out[reverse[key]] = value
      continue
    for name in _DIFFUSERS_QKV:
      if key.endswith("." + name):
        qkv_parts.setdefault(key[: -len(name)], {})[name] = value
        break
    else:
      unexpected.append(key)
  for prefix, parts in qkv_parts.items():
    if len(parts) != 3:
      unexpected += [prefix + n for n in parts]
      continue
    out[prefix + _QKV[0]] = np.concatenate([parts[n] for n in _DIFFUSERS_QKV], axis=0)
  if unexpected:
    raise KeyMismatchError("diffusers Lumina2 state dict", unexpected=unexpected)
  out["norm_final.weight"] = np.ones((cfg.dim,), np.float32)
  return out


def _split_block_key(key: str, cfg: NextDiTConfig) -> tuple[str, str]:
  parts = key.split(".")
  if len(parts) < 3 or parts[0] not in ("layers", "noise_refiner", "context_refiner"):
    raise KeyMismatchError("official NextDiT state dict", unexpected=[key])
  return ".".join(parts[:2]) + ".", ".".join(parts[2:])


def _is_modulated(prefix: str) -> bool:
  return not prefix.startswith("context_refiner.")


def diffusers_config(cfg: NextDiTConfig) -> dict[str, Any]:
  """`config.json` of the equivalent `Lumina2Transformer2DModel` (docs/equivalence/nextdit.md §2)."""
  return {
      "_class_name": "Lumina2Transformer2DModel",
      "sample_size": 128,
      "patch_size": cfg.patch_size,
      "in_channels": cfg.in_channels,
      "out_channels": None,
      "hidden_size": cfg.dim,
      "num_layers": cfg.n_layers,
      "num_refiner_layers": cfg.n_refiner_layers,
      "num_attention_heads": cfg.n_heads,
      "num_kv_heads": cfg.n_kv_heads,
      "multiple_of": cfg.multiple_of,
      "ffn_dim_multiplier": cfg.ffn_dim_multiplier,
      "norm_eps": cfg.norm_eps,
      "scaling_factor": 1.0,
      "axes_dim_rope": list(cfg.axes_dims),
      "axes_lens": list(cfg.axes_lens),
      "cap_feat_dim": cfg.cap_feat_dim,
  }


_DIFFUSERS_FIELDS = {
    "patch_size": "patch_size", "in_channels": "in_channels", "hidden_size": "dim",
    "num_layers": "n_layers", "num_refiner_layers": "n_refiner_layers",
    "num_attention_heads": "n_heads", "num_kv_heads": "n_kv_heads", "multiple_of": "multiple_of",
    "ffn_dim_multiplier": "ffn_dim_multiplier", "norm_eps": "norm_eps",
    "axes_dim_rope": "axes_dims", "axes_lens": "axes_lens", "cap_feat_dim": "cap_feat_dim",
}


def check_diffusers_config(config: dict[str, Any], cfg: NextDiTConfig) -> None:
  """Raise if a diffusers config.json describes a different architecture than `cfg`."""
  ours = dataclasses.asdict(cfg)
  diffs = []
  for theirs_name, our_name in _DIFFUSERS_FIELDS.items():
    if theirs_name not in config:
      continue
    theirs, mine = config[theirs_name], ours[our_name]
    if isinstance(mine, tuple):
      theirs = tuple(theirs)
    if theirs != mine:
      diffs.append(f"{theirs_name}={theirs!r} (config has {our_name}={mine!r})")
  out_channels = config.get("out_channels")
  if out_channels not in (None, cfg.in_channels):
    diffs.append(f"out_channels={out_channels} != in_channels {cfg.in_channels}")
  if diffs:
    raise ValueError("diffusers config.json does not match the model config: " + "; ".join(diffs))
