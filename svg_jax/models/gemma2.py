"""Gemma-2 text encoder (frozen): token ids -> one chosen hidden state, as transformers computes it.

SVG-T2I conditions on `hidden_states[-2]` of google/gemma-2-2b (docs/reference.md §1.5). Indices follow
transformers' convention: the tuple has num_layers + 1 entries, entry 0 is the scaled embedding,
entry k (1 <= k < num_layers) the raw output of decoder layer k - 1, and the last entry the
final-RMSNorm-ed output of the last layer. Only the layers up to the chosen entry are built and run,
so the params of a `hidden_layer=-2` model hold neither the last layer nor the final norm
(conversion can keep them).

Numerics as transformers' eager path: embeddings times sqrt(hidden) (the factor rounded to the model
dtype, as HF does), RMSNorm as x * rsqrt(mean(x^2) + eps) * (1 + w) in fp32, query scale
query_pre_attn_scalar**-0.5, tanh soft-capping of the logits, GeGLU with tanh-approximate GELU, half
rotation RoPE, and layer types alternating sliding-window / global attention (layer 0 sliding).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from svg_jax.input_errors import InputError
from svg_jax.models import config_dict, layers

LAYER_TYPES = ("sliding_attention", "full_attention")
_ACT_AXES = ("activation_batch", "activation_length", "activation_embed")


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
  """Gemma-2 hyperparameters; defaults are google/gemma-2-2b (= transformers' Gemma2Config's)."""
  vocab_size: int = 256000
  hidden_size: int = 2304
  num_layers: int = 26
  num_heads: int = 8
  num_kv_heads: int = 4
  head_dim: int = 256
  intermediate_size: int = 9216
  rms_norm_eps: float = 1e-6
  query_pre_attn_scalar: float = 256.0
  sliding_window: int | None = 4096
  attn_logit_softcapping: float | None = 50.0
  # Only used by the LM head, which a feature encoder never runs; kept so configs round-trip.
  final_logit_softcapping: float | None = 30.0
  rope_theta: float = 10000.0
  # None: transformers' rule for Gemma-2 (layer i is sliding when i is even). Otherwise one entry
  # per layer from LAYER_TYPES.
  layer_types: tuple[str, ...] | None = None
  # Index into transformers' `hidden_states` tuple (negative counts from the end).
  hidden_layer: int = -2
  # Implementation choices (no effect on the function computed).
  compute_dtype: str = "float32"
  # Gemma-2 needs causal / sliding masks and soft-capping, which only the xla backend supports.
  attention_backend: str = "xla"

  def layer_type(self, i: int) -> str:
    if self.layer_types is not None:
      return self.layer_types[i]
    return "sliding_attention" if (i + 1) % 2 else "full_attention"

  @property
  def hidden_index(self) -> int:
    """`hidden_layer` as a non-negative index in [0, num_layers]."""
    n = self.num_layers + 1
    if not -n <= self.hidden_layer < n:
      raise ValueError(f"hidden_layer {self.hidden_layer} out of range for {n} hidden states "
                       f"(num_layers={self.num_layers})")
    return self.hidden_layer % n

  @property
  def layers_needed(self) -> int:
    """Decoder layers that must run to produce the chosen hidden state."""
    return min(self.hidden_index, self.num_layers)

  @property
  def uses_final_norm(self) -> bool:
    return self.hidden_index == self.num_layers

  def validate(self) -> None:
    problems = []
    if self.num_heads % self.num_kv_heads:
      problems.append(
          f"num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}")
    if self.head_dim % 2:
      problems.append(f"head_dim {self.head_dim} must be even for RoPE")
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_layers:
        problems.append(f"layer_types has {len(self.layer_types)} entries, num_layers is "
                        f"{self.num_layers}")
      bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
      if bad:
        problems.append(f"unknown layer_types {bad}; expected entries of {LAYER_TYPES}")
    if not -(self.num_layers + 1) <= self.hidden_layer <= self.num_layers:
      problems.append(f"hidden_layer {self.hidden_layer} out of range for "
                      f"{self.num_layers + 1} hidden states (num_layers={self.num_layers})")
    if self.sliding_window is not None and self.sliding_window < 1:
      problems.append(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
    if self.attention_backend != "xla":
      problems.append(f"attention_backend {self.attention_backend!r}: Gemma-2 needs causal / "
                      "sliding-window masks and logit soft-capping, which only 'xla' supports")
    try:
      jnp.dtype(self.compute_dtype)
    except TypeError:
      problems.append(f"compute_dtype {self.compute_dtype!r} is not a dtype name")
    try:
      _ = self.hidden_index
    except ValueError as e:
      problems.append(str(e))
    if problems:
      raise InputError("invalid Gemma2 config: " + "; ".join(problems))

  @classmethod
  def from_dict(cls, d: Any) -> "Gemma2Config":
    return config_dict.from_dict(cls, d, "Gemma2", ("layer_types",))


def gemma_rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """transformers' Gemma2RMSNorm: normalize in fp32, multiply by (1 + w) in fp32, cast back."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (y * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


class GemmaRMSNorm(nn.Module):
  """RMSNorm whose `weight` is an offset from 1 (zeros init), as Gemma stores it."""
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    weight = self.param(
        "weight", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        (x.shape[-1],), jnp.float32)
    return gemma_rms_norm(x, weight, self.eps)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """Half-rotation RoPE tables [T, head_dim] computed in fp32 the way transformers does.

  inv_freq = 1 / theta^(arange(0, d, 2) / d) and angles = position * inv_freq, both in fp32; the
  frequencies are repeated (not interleaved) over the two halves of the head dim.
  """
  exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)
  angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
  emb = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def attention_masks(attention_mask: jax.Array, sliding_window: int | None
                    ) -> tuple[jax.Array, jax.Array]:
  """Bool masks [B, 1, T, T] for (global, sliding) layers: causal & valid key (& in window).

  Same rule as transformers' masking_utils: key j is visible to query i when j <= i, the key is not
  padding, and, for sliding layers, j > i - sliding_window.
  """
  t = attention_mask.shape[1]
  q_idx = jnp.arange(t)[:, None]
  k_idx = jnp.arange(t)[None, :]
  causal = k_idx <= q_idx
  keys = attention_mask.astype(bool)[:, None, None, :]
  full = causal[None, None] & keys
  if sliding_window is None:
    return full, full
  return full, full & (k_idx > q_idx - sliding_window)[None, None]


class Gemma2Attention(nn.Module):
  """GQA self-attention with RoPE on q/k, query_pre_attn_scalar scaling and logit soft-capping."""
  cfg: Gemma2Config

  @nn.compact
  def __call__(self, x, cos, sin, mask):
    cfg = self.cfg
    b, t, _ = x.shape
    hd, dt = cfg.head_dim, jnp.dtype(cfg.compute_dtype)
    init = nn.initializers.normal(0.02)
    q = layers.Linear(cfg.num_heads * hd, ("embed", "heads"), False, dt, init, name="q_proj")(x)
    k = layers.Linear(cfg.num_kv_heads * hd, ("embed", "kv_heads"), False, dt, init,
                      name="k_proj")(x)
    v = layers.Linear(cfg.num_kv_heads * hd, ("embed", "kv_heads"), False, dt, init,
                      name="v_proj")(x)
    q = layers.apply_half_rope(q.reshape(b, t, cfg.num_heads, hd), cos, sin)
    k = layers.apply_half_rope(k.reshape(b, t, cfg.num_kv_heads, hd), cos, sin)
    v = v.reshape(b, t, cfg.num_kv_heads, hd)
    out = layers.attention(
        q, k, v, backend=cfg.attention_backend, scale=float(cfg.query_pre_attn_scalar) ** -0.5,
        logits_soft_cap=cfg.attn_logit_softcapping, extra_mask=mask, compute_dtype=dt)
    out = out.reshape(b, t, cfg.num_heads * hd)
    return layers.Linear(cfg.hidden_size, ("heads", "embed"), False, dt, init, name="o_proj")(out)


class Gemma2MLP(nn.Module):
  """GeGLU: down(gelu_tanh(gate x) * up x)."""
  cfg: Gemma2Config

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dt = jnp.dtype(cfg.compute_dtype)
    init = nn.initializers.normal(0.02)
    gate = layers.Linear(cfg.intermediate_size, ("embed", "mlp"), False, dt, init,
                         name="gate_proj")(x)
    up = layers.Linear(cfg.intermediate_size, ("embed", "mlp"), False, dt, init, name="up_proj")(x)
    h = jax.nn.gelu(gate, approximate=True) * up
    return layers.Linear(cfg.hidden_size, ("mlp", "embed"), False, dt, init, name="down_proj")(h)


class Gemma2DecoderLayer(nn.Module):
  """Sandwich norms: x + post_attn(attn(in(x))), then x + post_ff(mlp(pre_ff(x)))."""
  cfg: Gemma2Config

  @nn.compact
  def __call__(self, x, cos, sin, mask):
    cfg = self.cfg
    eps = cfg.rms_norm_eps
    x = nn.with_logical_constraint(x, _ACT_AXES)
    h = Gemma2Attention(cfg, name="self_attn")(GemmaRMSNorm(eps, name="input_layernorm")(x),
                                               cos, sin, mask)
    x = x + GemmaRMSNorm(eps, name="post_attention_layernorm")(h)
    h = Gemma2MLP(cfg, name="mlp")(GemmaRMSNorm(eps, name="pre_feedforward_layernorm")(x))
    return x + GemmaRMSNorm(eps, name="post_feedforward_layernorm")(h)


class Gemma2Encoder(nn.Module):
  """Gemma-2 as a feature encoder.

  Args (call):
    input_ids: [B, L] int token ids.
    attention_mask: [B, L] bool/int, 1 = valid. Right padding is what SVG-T2I uses (the valid
      lengths returned only describe a right-padded mask); any mask is honoured as transformers
      honours it (a key mask on top of the causal / sliding mask).
  Returns (features [B, L, hidden_size] fp32 with padded positions zeroed, lengths [B] int32).
  """
  cfg: Gemma2Config

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    cfg = self.cfg
    cfg.validate()
    t = input_ids.shape[1]
    embedding = self.param(
        "embed_tokens",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        (cfg.vocab_size, cfg.hidden_size), jnp.float32)
    # HF multiplies by sqrt(hidden) cast to the weight dtype (bf16 in the released model).
    normalizer = jnp.asarray(math.sqrt(cfg.hidden_size), jnp.float32)
    normalizer = normalizer.astype(jnp.dtype(cfg.compute_dtype)).astype(jnp.float32)
    x = jnp.take(embedding, input_ids, axis=0) * normalizer

    cos, sin = rope_cos_sin(t, cfg.head_dim, cfg.rope_theta)
    full_mask, sliding_mask = attention_masks(attention_mask, cfg.sliding_window)
    for i in range(cfg.layers_needed):
      mask = sliding_mask if cfg.layer_type(i) == "sliding_attention" else full_mask
      x = Gemma2DecoderLayer(cfg, name=f"layers_{i}")(x, cos, sin, mask)
    if cfg.uses_final_norm:
      x = GemmaRMSNorm(cfg.rms_norm_eps, name="norm")(x)

    valid = attention_mask.astype(jnp.float32)
    lengths = jnp.sum(attention_mask.astype(jnp.int32), axis=1)
    return x * valid[..., None], lengths


def abstract_params(cfg: Gemma2Config, seq_len: int = 8):
  """Parameter shapes via jax.eval_shape (nothing allocated; works for the 2B config)."""
  ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  mask = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  variables = jax.eval_shape(
      lambda i, m: Gemma2Encoder(cfg).init(jax.random.key(0), i, m), ids, mask)
  return nn.unbox(variables["params"])
