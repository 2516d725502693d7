"""The one key map of the pixel decoder: our Flax params <-> official SVG autoencoder <-> diffusers.

Official layout (docs/reference.md §3.2): the Lightning `.ckpt` of the SVG autoencoder,
`state_dict` keys `decoder.*` (next to `encoder.*` DINOv3 weights and, in training checkpoints,
`loss.*`; R checkpoints also `extra_vit.*` / `norm_vit.*`). diffusers layout:
`diffusers.models.autoencoders.vae.Decoder` with an `AttnUpDecoderBlock2D` first
(docs/equivalence/autoencoder.md §2.2): official `up.{L}` is diffusers `up_blocks.{n-1-L}`.
Transforms: 3x3 conv OIHW <-> HWIO; 1x1 convs (`nin_shortcut`, attention q/k/v/proj_out)
[O, I, 1, 1] <-> kernel [I, O]; diffusers' attention projections are Linear [O, I].

The official loader is `strict=False`, which silently leaves absent attention weights random; here
every direction lists missing, unexpected and mis-shaped keys and raises. Keys of the other
autoencoder components are ignored by their prefix only. Params are the inner `params` collection of
`svg_jax.models.decoder.Decoder` (fp32 numpy arrays on import). File formats: decoder_io.py.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Mapping

import flax
import numpy as np

from svg_jax.convert import errors, layouts, safetensors_io, torch_pickle
from svg_jax.input_errors import InputError, MissingInput
from svg_jax.models.decoder import DecoderConfig

OFFICIAL_PREFIX = "decoder."
# Other components of the official autoencoder checkpoint, skipped by the decoder loader.
OTHER_COMPONENT_PREFIXES = ("encoder.", "loss.", "extra_vit.", "norm_vit.")
FORMATS = ("official", "diffusers")
TORCH_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")

# Per-format layout of the source tensor for each kind of our parameters.
# (convert/layouts.py: conv = OIHW <-> HWIO, conv1x1 = [O, I, 1, 1] <-> [I, O], linear = [O, I] <-> [I, O].)
_LAYOUT = {
    "official": {"conv3": "conv", "shortcut": "conv1x1", "attn": "conv1x1", "vector": "vector"},
    "diffusers": {"conv3": "conv", "shortcut": "conv1x1", "attn": "linear", "vector": "vector"},
}


class KeyMismatchError(errors.KeyMismatchError):
  """A checkpoint does not match the decoder config (lists missing, unexpected, mis-shaped keys)."""

  def __init__(self, what: str, missing=(), unexpected=(), misshaped=()):
    super().__init__(what, missing, unexpected, misshaped, model="decoder")


def key_map(cfg: DecoderConfig) -> list[tuple[tuple[str, ...], str, str, str, tuple[int, ...]]]:
  """Every parameter: (flax path, official key without prefix, diffusers key, kind, flax shape)."""
  entries = []
  n = cfg.num_levels

  def vec(path, off, dif, c):
    entries.append((path, off, dif, "vector", (c,)))

  def conv3(path, off, dif, cin, cout):
    entries.append((path + ("kernel",), off + ".weight", dif + ".weight", "conv3",
                    (3, 3, cin, cout)))
    vec(path + ("bias",), off + ".bias", dif + ".bias", cout)

  def dense(path, off, dif, kind, cin, cout):
    entries.append((path + ("kernel",), off + ".weight", dif + ".weight", kind, (cin, cout)))
    vec(path + ("bias",), off + ".bias", dif + ".bias", cout)

  def norm(path, off, dif, c):
    vec(path + ("scale",), off + ".weight", dif + ".weight", c)
    vec(path + ("bias",), off + ".bias", dif + ".bias", c)

  def resnet(mod, off, dif, cin, cout):
    norm((mod, "norm1"), off + ".norm1", dif + ".norm1", cin)
    conv3((mod, "conv1"), off + ".conv1", dif + ".conv1", cin, cout)
    norm((mod, "norm2"), off + ".norm2", dif + ".norm2", cout)
    conv3((mod, "conv2"), off + ".conv2", dif + ".conv2", cout, cout)
    if cin != cout:
      dense((mod, "nin_shortcut"), off + ".nin_shortcut", dif + ".conv_shortcut", "shortcut",
            cin, cout)

  def attn(mod, off, dif, c):
    norm((mod, "norm"), off + ".norm", dif + ".group_norm", c)
    for ours, theirs in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
      dense((mod, ours), f"{off}.{ours}", f"{dif}.{theirs}", "attn", c, c)

  c = cfg.level_channels(n - 1)
  conv3(("conv_in",), "conv_in", "conv_in", cfg.z_channels, c)
  resnet("mid_block_1", "mid.block_1", "mid_block.resnets.0", c, c)
  attn("mid_attn_1", "mid.attn_1", "mid_block.attentions.0", c)
  resnet("mid_block_2", "mid.block_2", "mid_block.resnets.1", c, c)
  for level in reversed(range(n)):
    d = n - 1 - level
    cout = cfg.level_channels(level)
    for j in range(cfg.num_res_blocks + 1):
      resnet(f"up_{level}_block_{j}", f"up.{level}.block.{j}", f"up_blocks.{d}.resnets.{j}",
             c, cout)
      c = cout
      if level == n - 1:
        attn(f"up_{level}_attn_{j}", f"up.{level}.attn.{j}", f"up_blocks.{d}.attentions.{j}", c)
    if level != 0:
      conv3((f"up_{level}_upsample", "conv"), f"up.{level}.upsample.conv",
            f"up_blocks.{d}.upsamplers.0.conv", c, c)
  norm(("norm_out",), "norm_out", "conv_norm_out", c)
  conv3(("conv_out",), "conv_out", "conv_out", c, cfg.out_ch)
  return entries


def _to_numpy(v: Any) -> np.ndarray:
  """numpy / jax / torch (CPU) tensor -> numpy, without importing torch."""
  if hasattr(v, "detach") and hasattr(v, "cpu"):  # a torch tensor
    v = v.detach().cpu()
    if str(v.dtype) == "torch.bfloat16":
      v = v.float()
    return v.numpy()
  return np.asarray(v)


def _names(cfg: DecoderConfig, fmt: str) -> Iterator[tuple[tuple[str, ...], str, str, tuple]]:
  """(flax path, key in `fmt`, source layout, flax shape) for every parameter."""
  if fmt not in FORMATS:
    raise InputError(f"unknown decoder checkpoint format {fmt!r}; choose one of {FORMATS}")
  for path, off, dif, kind, shape in key_map(cfg):
    yield path, (off if fmt == "official" else dif), _LAYOUT[fmt][kind], shape


def _to_params(flat: Mapping[str, Any], cfg: DecoderConfig, fmt: str, what: str) -> dict:
  names = list(_names(cfg, fmt))
  expected = {key: layouts.torch_shape(layout, shape) for _, key, layout, shape in names}
  missing = set(expected) - set(flat)
  unexpected = set(flat) - set(expected)
  misshaped = {f"{k} {tuple(np.shape(flat[k]))} != {expected[k]}" for k in set(expected) & set(flat)
               if tuple(np.shape(flat[k])) != expected[k]}
  if missing or unexpected or misshaped:
    raise KeyMismatchError(what, missing, unexpected, misshaped)
  out = {}
  for path, key, layout, _ in names:
    out[path] = layouts.to_flax(layout, _to_numpy(flat[key]).astype(np.float32))
  return flax.traverse_util.unflatten_dict(out)


def _flat_params(params: Any) -> dict[tuple[str, ...], np.ndarray]:
  params = flax.core.unfreeze(flax.linen.meta.unbox(params))
  if set(params) == {"params"}:  # accept the variables dict too
    params = params["params"]
  return {k: _to_numpy(v) for k, v in flax.traverse_util.flatten_dict(params).items()}


def check_param_shapes(shapes: Mapping[tuple[str, ...], tuple[int, ...]], cfg: DecoderConfig,
                       what: str = "Flax decoder params") -> None:
  """Raise KeyMismatchError unless `shapes` ({flax path: shape}) are exactly `cfg`'s params."""
  expected = {path: shape for path, _, _, _, shape in key_map(cfg)}
  missing = {"/".join(p) for p in set(expected) - set(shapes)}
  unexpected = {"/".join(p) for p in set(shapes) - set(expected)}
  misshaped = {f"{'/'.join(p)} {tuple(shapes[p])} != {expected[p]}"
               for p in set(expected) & set(shapes) if tuple(shapes[p]) != expected[p]}
  if missing or unexpected or misshaped:
    raise KeyMismatchError(what, missing, unexpected, misshaped)


def _checked_flat(params: Any, cfg: DecoderConfig) -> dict[tuple[str, ...], np.ndarray]:
  flat = _flat_params(params)
  check_param_shapes({k: v.shape for k, v in flat.items()}, cfg)
  return flat


def _from_params(params: Any, cfg: DecoderConfig, fmt: str) -> dict[str, np.ndarray]:
  flat = _checked_flat(params, cfg)
  return {key: layouts.to_torch(layout, flat[path]) for path, key, layout, _ in _names(cfg, fmt)}


def params_from_tree(tree: Any, cfg: DecoderConfig) -> dict:
  """A Flax params tree (or `{"params": ...}` variables) checked against `cfg` -> fp32 numpy."""
  flat = _checked_flat(tree, cfg)
  return flax.traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in flat.items()})


def strip_official_prefix(state: Mapping[str, Any], prefix: str = OFFICIAL_PREFIX
                          ) -> dict[str, Any]:
  """The decoder part of an official autoencoder state dict, with `prefix` removed.

  Keys of the other components (OTHER_COMPONENT_PREFIXES) are dropped; any other key that does not
  start with `prefix` is an error (it is neither a decoder key nor a known component)."""
  if not prefix:
    return dict(state)
  decoder = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  stray = sorted(k for k in state
                 if not k.startswith(prefix) and not k.startswith(OTHER_COMPONENT_PREFIXES))
  if stray:
    raise KeyMismatchError(
        f"official autoencoder state dict (decoder keys start with {prefix!r}; known other "
        f"components: {', '.join(OTHER_COMPONENT_PREFIXES)})", unexpected=stray)
  if not decoder:
    raise ValueError(f"official autoencoder state dict holds no {prefix!r} keys "
                     f"({len(state)} keys; first: {sorted(state)[:5]})")
  return decoder


def official_to_params(flat: Mapping[str, Any], cfg: DecoderConfig, *,
                       prefix: str = OFFICIAL_PREFIX) -> dict:
  """Official autoencoder state dict (`decoder.*` + ignored `encoder.*`/`loss.*`...) -> Flax params.

  With prefix="" `flat` must hold exactly the bare decoder keys (`conv_in.weight`, ...)."""
  what = f"official decoder state dict (prefix {prefix!r})"
  return _to_params(strip_official_prefix(flat, prefix), cfg, "official", what)


def params_to_official(params: Any, cfg: DecoderConfig, *,
                       prefix: str = OFFICIAL_PREFIX) -> dict[str, np.ndarray]:
  """Flax params -> official decoder keys, each written as `prefix + key` (default `decoder.`)."""
  return {prefix + k: v for k, v in _from_params(params, cfg, "official").items()}


def diffusers_to_params(flat: Mapping[str, Any], cfg: DecoderConfig) -> dict:
  """diffusers `vae.Decoder` state dict -> Flax params."""
  return _to_params(flat, cfg, "diffusers", "diffusers Decoder state dict")


def params_to_diffusers(params: Any, cfg: DecoderConfig) -> dict[str, np.ndarray]:
  """Flax params -> diffusers `vae.Decoder` state dict."""
  return _from_params(params, cfg, "diffusers")


def diffusers_config(cfg: DecoderConfig) -> dict[str, Any]:
  """kwargs of the diffusers `vae.Decoder` that computes our decoder
  (docs/equivalence/autoencoder.md §2.1)."""
  n = cfg.num_levels
  return dict(
      in_channels=cfg.z_channels, out_channels=cfg.out_ch,
      up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * (n - 1),
      block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
      layers_per_block=cfg.num_res_blocks, norm_num_groups=cfg.norm_groups, act_fn="silu",
      norm_type="group", mid_block_add_attention=True)


def check_diffusers_config(config: Mapping[str, Any], cfg: DecoderConfig) -> None:
  """Raise if `vae.Decoder` kwargs (a diffusers folder's config.json) describe another decoder
  than `cfg`; absent entries are not checked."""
  diffs = []
  for name, ours in diffusers_config(cfg).items():
    if name not in config:
      continue
    theirs = config[name]
    if isinstance(ours, tuple) and isinstance(theirs, list):
      theirs = tuple(theirs)
    if theirs != ours:
      diffs.append(f"{name}={theirs!r} (the decoder config gives {ours!r})")
  if diffs:
    raise ValueError("diffusers decoder config.json does not match the decoder config: "
                     + "; ".join(diffs))


def detect_format(keys) -> tuple[str, str]:
  """(format, official prefix) of a flat state dict, from its distinctive key names."""
  keys = set(keys)
  if any(k.startswith(OFFICIAL_PREFIX + "mid_block.") for k in keys):
    raise ValueError("this looks like a diffusers AutoencoderKL ('decoder.mid_block.*'); pass the "
                     "'decoder.*' keys without the prefix as a diffusers Decoder state dict")
  if any(k.startswith(OFFICIAL_PREFIX) for k in keys):
    return "official", OFFICIAL_PREFIX
  if any(k.startswith("mid.") or k.startswith("up.") for k in keys):
    return "official", ""
  if any(k.startswith("mid_block.") or k.startswith("up_blocks.") for k in keys):
    return "diffusers", ""
  raise InputError("cannot tell the decoder checkpoint format: no 'decoder.*' (official "
                   "autoencoder), 'mid.*' (bare official decoder) or 'mid_block.*' (diffusers) "
                   "keys; "
                   f"first keys: {sorted(keys)[:8]}")


def read_torch_state(path: str | os.PathLike) -> dict[str, Any]:
  """The state dict of a torch file: a Lightning checkpoint's `state_dict`, or the file's dict.
  Read without torch; classes named in `hyper_parameters` stay inert placeholders."""
  obj = torch_pickle.load_torch_file(path, allow_unknown_objects=True)
  if isinstance(obj, Mapping) and "state_dict" in obj:  # Lightning checkpoint
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{os.fspath(path)}: expected a state dict or a Lightning checkpoint with "
                     f"'state_dict', got {type(obj).__name__}")
  return dict(obj)


def _read_state(path: str | os.PathLike) -> dict[str, Any]:
  path = os.fspath(path)
  if os.path.isdir(path):
    raise InputError(f"decoder checkpoint {path} is a folder; give the checkpoint file "
                     f"(.safetensors or one of {TORCH_SUFFIXES})")
  if not os.path.isfile(path):
    raise MissingInput(f"decoder checkpoint {path} does not exist")
  if path.endswith(".safetensors"):
    return dict(safetensors_io.load_safetensors(path))
  if path.endswith(TORCH_SUFFIXES):
    return read_torch_state(path)
  raise InputError(f"{path}: unknown decoder checkpoint file type; expected .safetensors or one of "
                   f"{TORCH_SUFFIXES}")


def load_decoder(path: str | os.PathLike, cfg: DecoderConfig, fmt: str = "auto") -> dict:
  """Read a decoder checkpoint and convert it to Flax params.

  path: the official Lightning `.ckpt` (`state_dict` with `decoder.*`), a `.pth`/`.pt` state dict,
  or a `.safetensors` file, holding official keys (with or without `decoder.`) or diffusers keys.
  fmt: "auto" (from the key names), "official" or "diffusers"."""
  return state_to_params(_read_state(path), cfg, fmt)


def state_to_params(state: Mapping[str, Any], cfg: DecoderConfig, fmt: str = "auto") -> dict:
  """A flat state dict -> Flax params. fmt: "auto" (from the key names), "official" (with or
  without the `decoder.` prefix, other components' keys ignored) or "diffusers"."""
  prefix = ""
  if fmt == "auto":
    fmt, prefix = detect_format(state)
  elif fmt == "official":
    prefix = OFFICIAL_PREFIX if any(k.startswith(OFFICIAL_PREFIX) for k in state) else ""
  elif fmt != "diffusers":
    raise InputError(
        f"unknown decoder checkpoint format {fmt!r}; choose 'auto' or one of {FORMATS}")
  if fmt == "official":
    return official_to_params(state, cfg, prefix=prefix)
  return diffusers_to_params(state, cfg)
