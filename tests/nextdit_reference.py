"""The reference NextDiT for parity tests: diffusers' Lumina2Transformer2DModel, loaded with
diffusers' own converter of official Lumina-Image-2.0 checkpoints (not ours), aligned to the
official SVG-T2I model as measured in docs/equivalence/nextdit.md §8:
q/k-norm eps set to the config's value and the RoPE tables replaced by fp32-angle complex64 tables.
"""
import numpy as np
import torch
from diffusers import Lumina2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers

from svg_jax.convert import nextdit as convert
from svg_jax.models.nextdit import NextDiTConfig


def random_official_state(cfg: NextDiTConfig, seed: int = 0, qk_scale: float = 1.0) -> dict:
  """Random weights for every official key (adaLN and final layers included, norms around 1)."""
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in convert.official_shapes(cfg).items():
    if len(shape) == 1 and key.endswith("weight"):  # norm weights
      w = 1.0 + 0.2 * rng.standard_normal(shape)
    else:
      fan_in = shape[-1] if len(shape) == 2 else 1
      w = rng.standard_normal(shape) / np.sqrt(fan_in)
    state[key] = w.astype(np.float32)
  if qk_scale != 1.0:  # shrink q/k so the q/k-norm eps matters (docs/equivalence/nextdit.md §4.1)
    qk_rows = (cfg.n_heads + cfg.n_kv_heads) * cfg.head_dim
    for key in state:
      if key.endswith("attention.qkv.weight"):
        state[key][:qk_rows] *= qk_scale
  return state


def official_rope_tables(cfg: NextDiTConfig) -> list:
  """Official tables: angles in float64, rounded to float32, then complex64."""
  tables = []
  for d, n in zip(cfg.axes_dims, cfg.axes_lens):
    freqs = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64)[: d // 2] / d)
    angles = torch.from_numpy(np.outer(np.arange(n, dtype=np.float64), freqs).astype(np.float32))
    tables.append(torch.polar(torch.ones_like(angles), angles))
  return tables


def diffusers_state(official_state: dict, cfg: NextDiTConfig) -> dict[str, np.ndarray]:
  """The official tensors under diffusers' names, as diffusers' single-file loader converts them.
  Its converter splits a fused qkv at the 2B model's rows (2304 / 768 / 768), so each qkv goes
  through it alone as an empty placeholder of those rows, which yields its to_q / to_k / to_v
  names in split order, and is split here at `cfg`'s rows (the official attention's [q; k; v])."""
  state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in official_state.items()}
  fused = {k: state.pop(k) for k in list(state) if k.endswith(".qkv.weight")}
  out = {k: v.numpy() for k, v in convert_lumina2_to_diffusers(state).items()}
  rows = [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]
  for key, qkv in fused.items():
    names = list(convert_lumina2_to_diffusers({key: torch.empty(2304 + 768 + 768, 0)}))
    assert len(names) == 3, names
    out.update((name, part.numpy()) for name, part in zip(names, torch.split(qkv, rows)))
  return out


def build_reference(cfg: NextDiTConfig, official_state: dict) -> Lumina2Transformer2DModel:
  model = Lumina2Transformer2DModel(**{
      k: v for k, v in convert.diffusers_config(cfg).items() if not k.startswith("_")})
  state = diffusers_state(official_state, cfg)
  model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
                        strict=True)
  for module in model.modules():
    if hasattr(module, "norm_q") and module.norm_q is not None:
      module.norm_q.eps = cfg.qk_norm_eps
      module.norm_k.eps = cfg.qk_norm_eps
  model.rope_embedder.freqs_cis = official_rope_tables(cfg)
  return model.eval()


def reference_forward(model, x_nhwc, t, cap_feats, cap_mask) -> np.ndarray:
  """Run diffusers on channel-last numpy inputs; returns channel-last numpy velocity (fp32, also
  under a bf16 autocast)."""
  with torch.no_grad():
    out = model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))),
                torch.from_numpy(t), torch.from_numpy(cap_feats),
                torch.from_numpy(cap_mask.astype(np.int64)), return_dict=False)[0]
  return out.float().numpy().transpose(0, 2, 3, 1)
