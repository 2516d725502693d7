"""The one key map of the DINOv3 ViT: our Flax params <-> official dinov3 state dict <-> HF.

Official layout: the flat `dinov3_vits16plus_pretrain_lvd1689m-*.pth` state dict (docs/reference.md §2.1:
212 tensors = 199 parameters + 13 buffers). HF layout: `transformers.DINOv3ViTModel.state_dict()`
(docs/equivalence/autoencoder.md §1.3). Each row of `_TOP` / `_BLOCK` / `_TAIL` names one Flax parameter
and its official and HF keys, so importer, exporter and parity tests share this single table.

The qkv bias. Officially `qkv` is a `LinearKMaskedBias`: the bias it adds is `bias * bias_mask`,
`bias_mask` being a buffer that must come from the checkpoint (the released ViT-S/16+ file has both
all zeros). Our `qkv/bias` parameter is that product, the effective bias. Importing checks the mask
(finite, 0/1) and the k-slice rule: the effective k bias (slice [dim:2dim]) must be 0, which is
what `mask_k_bias` means and the only case HF (`key_bias=False`) can express. Exporting to the
official layout writes `bias` = effective bias and `bias_mask` = ones: the official forward then
adds exactly our bias, whatever the original mask was (a zero mask would lose the q/v biases).

`rope_embed.periods` is a buffer derived from the config; exporting writes ours (bit-equal to what
torch computes on CPU) and importing requires the file's to match it within 2 ulp (other devices'
fp32 pow may round differently), else the checkpoint uses another RoPE parametrization.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Mapping

import numpy as np

from svg_jax.convert import errors, layouts, scan_layout
from svg_jax.input_errors import InputError, MissingInput
from svg_jax.convert.safetensors_io import load_safetensors, load_sharded_safetensors
from svg_jax.convert.torch_pickle import load_torch_file
from svg_jax.models.dinov3 import DINOv3Config, abstract_params, rope_periods

# Row: (flax path, official key, official kind, HF key, HF kind). Kinds: "copy"; "linear"
# ([out, in] <-> our [in, out]); "conv" (OIHW <-> our HWIO); "lead1" (ours [n, d] <-> [1, n, d]).
# Rows are in the official registration order: _TOP, blocks (_BLOCK per block), _TAIL.
_TOP = [
    (("cls_token",), "cls_token", "lead1", "embeddings.cls_token", "lead1"),
    (("register_tokens",), "storage_tokens", "lead1", "embeddings.register_tokens", "lead1"),
    (("mask_token",), "mask_token", "copy", "embeddings.mask_token", "lead1"),
    (("patch_embed", "kernel"), "patch_embed.proj.weight", "conv",
     "embeddings.patch_embeddings.weight", "conv"),
    (("patch_embed", "bias"), "patch_embed.proj.bias", "copy",
     "embeddings.patch_embeddings.bias", "copy"),
]
_TAIL = [
    (("norm", "scale"), "norm.weight", "copy", "norm.weight", "copy"),
    (("norm", "bias"), "norm.bias", "copy", "norm.bias", "copy"),
]
# Per block: official prefix `blocks.{i}.`, HF prefix `model.layer.{i}.`. The fused qkv rows map to
# three HF keys (q, k, v); the HF k bias does not exist (None).
_QKV_W = "qkv_weight"
_QKV_B = "qkv_bias"
_BLOCK = [
    (("norm1", "scale"), "norm1.weight", "copy", "norm1.weight", "copy"),
    (("norm1", "bias"), "norm1.bias", "copy", "norm1.bias", "copy"),
    (("attn", "qkv", "kernel"), "attn.qkv.weight", _QKV_W,
     ("attention.q_proj.weight", "attention.k_proj.weight", "attention.v_proj.weight"), _QKV_W),
    (("attn", "qkv", "bias"), "attn.qkv.bias", _QKV_B,
     ("attention.q_proj.bias", None, "attention.v_proj.bias"), _QKV_B),
    (("attn", "proj", "kernel"), "attn.proj.weight", "linear", "attention.o_proj.weight", "linear"),
    (("attn", "proj", "bias"), "attn.proj.bias", "copy", "attention.o_proj.bias", "copy"),
    (("ls1",), "ls1.gamma", "copy", "layer_scale1.lambda1", "copy"),
    (("norm2", "scale"), "norm2.weight", "copy", "norm2.weight", "copy"),
    (("norm2", "bias"), "norm2.bias", "copy", "norm2.bias", "copy"),
    (("mlp", "w1", "kernel"), "mlp.w1.weight", "linear", "mlp.gate_proj.weight", "linear"),
    (("mlp", "w1", "bias"), "mlp.w1.bias", "copy", "mlp.gate_proj.bias", "copy"),
    (("mlp", "w2", "kernel"), "mlp.w2.weight", "linear", "mlp.up_proj.weight", "linear"),
    (("mlp", "w2", "bias"), "mlp.w2.bias", "copy", "mlp.up_proj.bias", "copy"),
    (("mlp", "w3", "kernel"), "mlp.w3.weight", "linear", "mlp.down_proj.weight", "linear"),
    (("mlp", "w3", "bias"), "mlp.w3.bias", "copy", "mlp.down_proj.bias", "copy"),
    (("ls2",), "ls2.gamma", "copy", "layer_scale2.lambda1", "copy"),
]
# Official buffers with no Flax parameter (HF recomputes `inv_freq` and has no mask).
_PERIODS = "rope_embed.periods"
_BIAS_MASK = "attn.qkv.bias_mask"
_HF_BLOCK = "model.layer."
# Hub files written by transformers' conversion script say `layer.N`; transformers 5 renames that
# to the module name `model.layer.N` on load, and so do we.
_HF_HUB_BLOCK = "layer."
_PERIODS_RTOL = 2.5e-7


class KeyMismatchError(errors.KeyMismatchError):
  """A checkpoint does not match the DINOv3 config (lists missing, unexpected, mis-shaped keys)."""

  def __init__(self, what: str, missing=(), unexpected=(), misshaped=()):
    super().__init__(what, missing, unexpected, misshaped, model="DINOv3")


# ----------------------------------------------------------------------------------------------
# The table, instantiated for a config


def _rows(cfg: DINOv3Config) -> list[tuple[tuple, Any, str, Any, str]]:
  """Every (flax path, official key, kind, HF key(s), kind) for `cfg`, in registration order."""
  flat = _flat_shapes(cfg)
  rows = []
  for path, off, okind, hf, hkind in _TOP:
    if path in flat:
      rows.append((path, off, okind, hf, hkind))
  for i in range(cfg.depth):
    for path, off, okind, hf, hkind in _BLOCK:
      full = (f"blocks_{i}",) + path
      if full not in flat:
        continue  # disabled by the config (no LayerScale / biases)
      hf_full = (tuple(None if k is None else f"{_HF_BLOCK}{i}.{k}" for k in hf)
                 if isinstance(hf, tuple) else f"{_HF_BLOCK}{i}.{hf}")
      rows.append((full, f"blocks.{i}.{off}", okind, hf_full, hkind))
  rows += _TAIL
  return rows


@functools.lru_cache(maxsize=16)
def _flat_shapes_cached(cfg: DINOv3Config) -> tuple[tuple[tuple, tuple[int, ...]], ...]:
  return tuple((p, tuple(v.shape)) for p, v in _unscanned_flat(abstract_params(cfg), cfg).items())


def _flat_shapes(cfg: DINOv3Config) -> dict[tuple, tuple[int, ...]]:
  """Unscanned Flax path -> shape, from the abstract (never allocated) params."""
  return dict(_flat_shapes_cached(cfg))


def _ext_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  return (1,) + tuple(shape) if kind == "lead1" else layouts.torch_shape(_layout(kind), shape)


def _to_ext(kind: str, x: np.ndarray) -> np.ndarray:
  return x[None] if kind == "lead1" else layouts.to_torch(_layout(kind), x)


def _from_ext(kind: str, x: np.ndarray) -> np.ndarray:
  return x[0] if kind == "lead1" else layouts.to_flax(_layout(kind), x)


def _layout(kind: str) -> str:
  return kind if kind in ("linear", "conv") else "vector"


def official_shapes(cfg: DINOv3Config) -> dict[str, tuple[int, ...]]:
  """Official key -> shape (parameters and buffers), in the official registration order."""
  flat = _flat_shapes(cfg)
  shapes = {}
  for path, off, kind, _, _ in _rows(cfg):
    shapes[off] = flat[path][::-1] if kind == _QKV_W else _ext_shape(kind, flat[path])
    if kind == _QKV_B:
      shapes[off.replace("attn.qkv.bias", _BIAS_MASK)] = flat[path]
    if off == "patch_embed.proj.bias":
      shapes[_PERIODS] = (cfg.head_dim // 4,)
  return shapes


def hf_shapes(cfg: DINOv3Config) -> dict[str, tuple[int, ...]]:
  """HF `DINOv3ViTModel` state-dict key -> shape."""
  flat = _flat_shapes(cfg)
  shapes = {}
  for path, _, _, hf, kind in _rows(cfg):
    if kind in (_QKV_W, _QKV_B):
      for key in hf:
        if key is not None:
          shapes[key] = (cfg.dim, cfg.dim) if kind == _QKV_W else (cfg.dim,)
    else:
      shapes[hf] = _ext_shape(kind, flat[path])
  return shapes


def hf_config(cfg: DINOv3Config) -> dict[str, Any]:
  """Keyword arguments of the equivalent `transformers.DINOv3ViTConfig` (docs/equivalence/autoencoder.md §1.2)."""
  return {
      "patch_size": cfg.patch_size,
      "num_channels": cfg.in_channels,
      "hidden_size": cfg.dim,
      "intermediate_size": cfg.ffn_hidden,
      "num_hidden_layers": cfg.depth,
      "num_attention_heads": cfg.num_heads,
      "use_gated_mlp": True,
      "hidden_act": "silu",
      "layer_norm_eps": cfg.ln_eps,
      "rope_theta": cfg.rope_base,
      "num_register_tokens": cfg.num_register_tokens,
      "query_bias": cfg.qkv_bias,
      "key_bias": False,
      "value_bias": cfg.qkv_bias,
      "proj_bias": cfg.proj_bias,
      "mlp_bias": cfg.ffn_bias,
  }


def check_hf_config(config: Mapping[str, Any], cfg: DINOv3Config) -> None:
  """Raise if an HF config.json describes another architecture than `cfg`."""
  diffs = [f"{k}={config[k]!r} (ours {v!r})" for k, v in hf_config(cfg).items()
           if k in config and config[k] != v]
  if cfg.layerscale_init is None:
    diffs.append("our config has no LayerScale, HF DINOv3 always has it")
  if diffs:
    raise InputError("HF DINOv3 config.json does not match the model config: " + "; ".join(diffs))


# ----------------------------------------------------------------------------------------------
# Scanned <-> unscanned Flax layouts


def _unscanned_flat(params, cfg: DINOv3Config) -> dict[tuple, Any]:
  del cfg  # the stack's own depth decides, so a wrong depth shows up as mismatched keys
  return scan_layout.unscan(params, ("blocks", "block"), "blocks")


def _rescan(flat: dict[tuple, np.ndarray], cfg: DINOv3Config) -> dict:
  return scan_layout.rescan(flat, ("blocks", "block"), "blocks", cfg.depth, cfg.scan_layers)


def _params_flat(params, cfg: DINOv3Config) -> dict[tuple, np.ndarray]:
  # Copies: exported dicts never alias (or write into) the params.
  flat = {k: np.array(v, np.float32) for k, v in _unscanned_flat(params, cfg).items()}
  expected = _flat_shapes(cfg)
  missing = set(expected) - set(flat)
  unexpected = set(flat) - set(expected)
  misshaped = {f"{'/'.join(k)} {flat[k].shape} != {expected[k]}" for k in set(expected) & set(flat)
               if flat[k].shape != expected[k]}
  if missing or unexpected or misshaped:
    raise KeyMismatchError("Flax DINOv3 params", ["/".join(p) for p in missing],
                           ["/".join(p) for p in unexpected], misshaped)
  return flat


def _check_keys(what: str, state: Mapping[str, Any], expected: dict[str, tuple[int, ...]]) -> None:
  missing = set(expected) - set(state)
  unexpected = set(state) - set(expected)
  misshaped = {f"{k} {tuple(np.shape(state[k]))} != {expected[k]}"
               for k in set(expected) & set(state) if tuple(np.shape(state[k])) != expected[k]}
  if missing or unexpected or misshaped:
    raise KeyMismatchError(what, missing, unexpected, misshaped)


def _k_bias_problem(bias: np.ndarray, dim: int) -> bool:
  return bool(np.any(bias[dim:2 * dim] != 0))


# ----------------------------------------------------------------------------------------------
# Official


def official_to_params(state: Mapping[str, Any], cfg: DINOv3Config) -> dict:
  """Official dinov3 state dict (numpy arrays) -> Flax params (fp32 numpy) for `cfg`'s layout."""
  _check_keys("official DINOv3 state dict", state, official_shapes(cfg))
  periods = np.asarray(state[_PERIODS], np.float32)
  ours = rope_periods(cfg)
  if not np.allclose(periods, ours, rtol=_PERIODS_RTOL, atol=0):
    raise ValueError(
        f"{_PERIODS} {periods.tolist()} differs from base^(2k/{cfg.head_dim // 2}) with base "
        f"{cfg.rope_base} = {ours.tolist()}: the checkpoint uses another RoPE parametrization")
  flat, problems = {}, []
  for path, off, kind, _, _ in _rows(cfg):
    w = np.asarray(state[off]).astype(np.float32)
    if kind == _QKV_B:
      mask_key = off.replace("attn.qkv.bias", _BIAS_MASK)
      mask = np.asarray(state[mask_key]).astype(np.float32)
      if not np.all(np.isfinite(mask)):
        problems.append(f"{mask_key} holds NaN/inf (never initialized: the official constructor "
                        "fills it with NaN and only a checkpoint sets it)")
        continue
      if not np.all((mask == 0) | (mask == 1)):
        problems.append(f"{mask_key} has values other than 0 and 1")
        continue
      w = w * mask
      if _k_bias_problem(w, cfg.dim):
        problems.append(f"{off} * bias_mask has a non-zero k slice [{cfg.dim}:{2 * cfg.dim}] "
                        "(mask_k_bias means the k bias is masked)")
      flat[path] = w
    elif kind == _QKV_W:
      flat[path] = layouts.to_flax("linear", w)
    else:
      flat[path] = _from_ext(kind, w)
  if problems:
    raise ValueError("official DINOv3 qkv bias: " + "; ".join(problems))
  return _rescan(flat, cfg)


def params_to_official(params, cfg: DINOv3Config) -> dict[str, np.ndarray]:
  """Flax params -> official flat state dict (fp32), keys in official registration order.

  `bias_mask` is written as ones and `qkv.bias` as our effective bias (see the module docstring).
  """
  flat = _params_flat(params, cfg)
  state = {}
  for path, off, kind, _, _ in _rows(cfg):
    w = flat[path]
    if kind == _QKV_B:
      if _k_bias_problem(w, cfg.dim):
        raise ValueError(f"params {'/'.join(path)} has a non-zero k slice; the official "
                         "mask_k_bias model masks the k bias")
      state[off] = w.copy()
      state[off.replace("attn.qkv.bias", _BIAS_MASK)] = np.ones_like(w)
    elif kind == _QKV_W:
      state[off] = layouts.to_torch("linear", w)
    else:
      state[off] = np.ascontiguousarray(_to_ext(kind, w))
    if off == "patch_embed.proj.bias":
      state[_PERIODS] = rope_periods(cfg)
  return {k: state[k] for k in official_shapes(cfg)}


# ----------------------------------------------------------------------------------------------
# Hugging Face


def _hf_module_names(state: Mapping[str, Any]) -> dict[str, Any]:
  """Rename hub-file block keys `layer.N...` to the module names `model.layer.N...`."""
  out, clashes = {}, []
  for key, value in state.items():
    name = _HF_BLOCK + key[len(_HF_HUB_BLOCK):] if key.startswith(_HF_HUB_BLOCK) else key
    if name in out:
      clashes.append(f"{key} (also given as {name})")
    out[name] = value
  if clashes:
    raise KeyMismatchError("HF DINOv3 state dict", unexpected=clashes)
  return out


def hf_to_params(state: Mapping[str, Any], cfg: DINOv3Config) -> dict:
  """HF `DINOv3ViTModel` state dict (numpy arrays) -> Flax params (fp32 numpy).

  The HF model has no k bias (`key_bias=False`), so the k slice of our qkv bias is 0.
  """
  state = _hf_module_names(state)
  _check_keys("HF DINOv3 state dict", state, hf_shapes(cfg))
  flat = {}
  for path, _, _, hf, kind in _rows(cfg):
    if kind == _QKV_W:
      flat[path] = np.concatenate(
          [layouts.to_flax("linear", np.asarray(state[k], np.float32)) for k in hf], axis=1)
    elif kind == _QKV_B:
      zeros = np.zeros((cfg.dim,), np.float32)
      flat[path] = np.concatenate(
          [zeros if k is None else np.asarray(state[k], np.float32) for k in hf])
    else:
      flat[path] = _from_ext(kind, np.asarray(state[hf]).astype(np.float32))
  return _rescan(flat, cfg)


def params_to_hf(params, cfg: DINOv3Config, hub_names: bool = False) -> dict[str, np.ndarray]:
  """Flax params -> HF `DINOv3ViTModel` state dict (fp32).

  Block keys are the module names `model.layer.N...` (what `state_dict()` / `load_state_dict`
  use), or with `hub_names` the `layer.N...` that `save_pretrained` writes to files.
  """
  flat = _params_flat(params, cfg)
  state = {}
  for path, _, _, hf, kind in _rows(cfg):
    w = flat[path]
    if kind == _QKV_W:
      for key, part in zip(hf, np.split(w, 3, axis=1)):
        state[key] = layouts.to_torch("linear", part)
    elif kind == _QKV_B:
      if _k_bias_problem(w, cfg.dim):
        raise ValueError(f"params {'/'.join(path)} has a non-zero k slice; HF DINOv3 has no k bias")
      for key, part in zip(hf, np.split(w, 3)):
        if key is not None:
          state[key] = part.copy()
    else:
      state[hf] = np.ascontiguousarray(_to_ext(kind, w))
  if hub_names:
    state = {(_HF_HUB_BLOCK + k[len(_HF_BLOCK):] if k.startswith(_HF_BLOCK) else k): v
             for k, v in state.items()}
  return state


# ----------------------------------------------------------------------------------------------
# Files


# Keys only a DINOv3 state dict has, HF's first: the official `cls_token` is also the tail of HF's
# `embeddings.cls_token`, so HF's must match first for a nested copy's prefix to come out right.
_HF_MARKERS = ("embeddings.cls_token", "embeddings.patch_embeddings.weight")
_OFFICIAL_MARKERS = ("cls_token", "patch_embed.proj.weight")
PREFIX_FLAG = "--config.autoencoder.encoder_prefix"


def detect_format(state: Mapping[str, Any], source: str = "") -> str:
  """"official" or "hf" from the key names; `source` (the file) names the input in errors."""
  keys = set(state)
  if any(k in keys for k in _OFFICIAL_MARKERS):
    return "official"
  if any(k in keys for k in _HF_MARKERS):
    return "hf"
  raise InputError(f"{source + ': ' if source else ''}not a DINOv3 state dict (neither official "
                   f"`cls_token` nor HF `embeddings.cls_token`); first keys: {sorted(keys)[:10]}")


def nested_prefixes(keys) -> list[str]:
  """The key prefixes under which a DINOv3 state dict sits inside a bigger one (the SVG autoencoder
  .ckpt keeps its encoder under `encoder.`), shortest first."""
  found = set()
  for key in keys:
    for marker in _HF_MARKERS + _OFFICIAL_MARKERS:
      if isinstance(key, str) and key.endswith("." + marker):
        found.add(key[:-len(marker)])
        break
  return sorted(found, key=lambda p: (len(p), p))


def _is_dinov3(keys) -> bool:
  return any(k in keys for k in _OFFICIAL_MARKERS + _HF_MARKERS)


def _encoder_file(path: str) -> str:
  # Every script reads the encoder from this config field: naming it says which flag to fix.
  return f"the encoder file {path} (autoencoder.encoder_path)"


def _select_prefix(state: dict, path: str, prefix: str) -> dict:
  """The sub-dict under `prefix` (stripped), or `state` itself for no prefix. A file whose DINOv3
  weights sit under another prefix than the one given is bad input naming the prefix to set."""
  nested = nested_prefixes(state)
  if not prefix:
    if nested and not _is_dinov3(state):
      raise InputError(f"{_encoder_file(path)} is not a DINOv3 state dict itself but holds one "
                       f"under the key prefix {nested[0]!r} (as an SVG autoencoder .ckpt does): "
                       f"set {PREFIX_FLAG}={nested[0]}")
    return state
  sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  if _is_dinov3(sub):
    return sub
  if _is_dinov3(state):
    hint = f"the file is a DINOv3 state dict itself: leave {PREFIX_FLAG} empty"
  elif nested:
    hint = f"its DINOv3 weights sit under {nested[0]!r}: set {PREFIX_FLAG}={nested[0]}"
  else:
    hint = f"first keys: {sorted(state)[:10]}"
  given = f"the prefix {prefix!r} (autoencoder.encoder_prefix)"
  what = (f"no key starts with {given}" if not sub else
          f"the keys under {given} are not a DINOv3 state dict (neither official `cls_token` "
          "nor HF `embeddings.cls_token`)")
  raise InputError(f"{_encoder_file(path)}: {what}; {hint}")


def _read_state(path: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """(flat state dict, HF config.json or None) from a .pth/.pt/.ckpt, .safetensors or HF folder."""
  path = os.fspath(path)
  if os.path.isdir(path):
    config = None
    config_path = os.path.join(path, "config.json")
    if os.path.exists(config_path):
      try:
        with open(config_path, encoding="utf-8") as f:
          config = json.load(f)
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{config_path}: not a JSON config ({e})") from e
      if not isinstance(config, dict):
        raise InputError(f"{config_path}: not a JSON object, a {type(config).__name__}")
    return dict(load_sharded_safetensors(path)), config
  if not os.path.exists(path):
    raise MissingInput(f"DINOv3 checkpoint not found: {path}")
  if path.endswith(".safetensors"):
    return dict(load_safetensors(path)), None
  if path.endswith((".pth", ".pt", ".ckpt", ".bin")):
    # Lightning .ckpt files keep arbitrary classes in `hyper_parameters`: read those inertly.
    obj = load_torch_file(path, allow_unknown_objects=path.endswith(".ckpt"))
    # Lightning checkpoints (e.g. the SVG autoencoder .ckpt) nest the weights under "state_dict".
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
      obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
      raise InputError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj), None
  raise InputError(f"unknown DINOv3 checkpoint type {path!r}: expected .pth/.pt/.ckpt/.bin, "
                   ".safetensors or an HF model folder")


def load_dinov3(path: str, cfg: DINOv3Config = DINOv3Config(), prefix: str = "") -> dict:
  """Read an official .pth, an official or HF .safetensors, or an HF folder -> Flax params.

  `prefix` selects and strips a sub-dict (e.g. "encoder." in an SVG autoencoder checkpoint, which
  carries a copy of the DINOv3 weights next to its decoder); other keys are then ignored.
  """
  state, config = _read_state(path)
  state = _select_prefix(state, os.fspath(path), prefix)
  if config is not None:
    check_hf_config(config, cfg)
  fmt = detect_format(state, _encoder_file(os.fspath(path)))
  return official_to_params(state, cfg) if fmt == "official" else hf_to_params(state, cfg)
