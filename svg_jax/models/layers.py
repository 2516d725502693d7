"""Building blocks shared by every model: 2-D Linear, RMSNorm, attention with backend dispatch, RoPE.

Numerics follow docs/design.md: parameters are fp32, matmul inputs are cast to a compute dtype with fp32
accumulation and fp32 output (rounded once to bf16 where the activations are bf16), norms / RoPE /
softmax statistics run in fp32.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.layout import Layout, with_layout_constraint

from svg_jax.models import kernel_residuals, splash_attention

Dtype = Any
Axes = tuple[str | None, ...]

# auto: splash when the trace compiles for a TPU (the current mesh's devices), xla otherwise.
ATTENTION_BACKENDS = ("xla", "cudnn", "splash", "auto")


def _row_major(a: jax.Array) -> jax.Array:
  """a as a real row-major array, so XLA:CPU hands the dot reading it to its fast (YNNPACK) path
  instead of folding a transpose into a dot it only runs on the slow, upcasting path.

  Only on a single CPU device: under a multi-device mesh the pinned layout stops the partitioner
  from carrying the batch sharding through the transpose, and the weight-gradient dots then
  all-gather the whole micro-batch onto every device (seen in launch/aot_compile.py)."""
  mesh = jax.sharding.get_abstract_mesh()
  if splash_attention.compile_platform() != "cpu" or (not mesh.empty and mesh.size > 1):
    return a
  return with_layout_constraint(a, Layout(major_to_minor=tuple(range(a.ndim))))


def _materialized_transpose(a: jax.Array) -> jax.Array:
  """a with its last two axes swapped, as a real row-major copy."""
  return _row_major(jnp.swapaxes(a, -1, -2))


def _dot(a: jax.Array, b: jax.Array, out_dtype: Dtype = jnp.float32) -> jax.Array:
  """[..., M, K] @ [..., K, N] -> [..., M, N], leading axes batched; fp32 accumulation, the
  result rounded once to `out_dtype`."""
  batch = tuple(range(a.ndim - 2))
  return jax.lax.dot_general(a, b, (((a.ndim - 1,), (a.ndim - 2,)), (batch, batch)),
                             preferred_element_type=out_dtype)


GPU_PLATFORMS = ("gpu", "cuda")


# A bf16 result instead of an fp32 one (`out`): the GEMM rounds its fp32 sums once, as an fp32
# result cast to bf16 would be, but a remat policy that saves matmul outputs (dots) then keeps them
# in bf16, and the forward writes half the bytes. Only where that is so: XLA:GPU saves the fp32
# result and converts after it (the 2.6B stage-1 step at 32 samples: 99.6 -> 78.1 GiB,
# docs/performance.md); XLA:TPU already saves the bf16 value (v5p-16 at 64 samples a chip rose
# 76.6 -> 79.1 GiB with bf16 GEMM results), and XLA:CPU's bf16-result GEMM adds the products in
# another order.
_BF16_RESULT_PLATFORMS = GPU_PLATFORMS


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bf16_matmul(x: jax.Array, w: jax.Array, out) -> jax.Array:
  return _dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), out)


def _bf16_matmul_fwd(x, w, out):
  # Operands may be transposed views (attention's head-major layouts): copy them in bf16.
  xb, wb = _row_major(x.astype(jnp.bfloat16)), _row_major(w.astype(jnp.bfloat16))
  return _dot(xb, wb, out), (xb, wb)


def _bf16_matmul_bwd(out, res, g):
  del out  # the cotangent goes back in bf16 either way
  # Cotangents go back in bf16 with fp32 accumulation (plain autodiff would multiply the fp32
  # cotangent with a bf16 operand and run the whole backward upcast); transposes are made in bf16.
  xb, wb = res
  gb = _row_major(g.astype(jnp.bfloat16))
  dx = _dot(gb, _materialized_transpose(wb))
  m, k = xb.shape[-2:]
  n = gb.shape[-1]
  if m * k <= (m + k) * n:
    dw = _dot(_materialized_transpose(xb), gb)
  else:
    # (g^T x)^T copies fewer elements when x is the wide one (an FFN's down projection). The dot's
    # output is pinned row-major too: folded into the transpose it would leave the fast path.
    dw = _materialized_transpose(_row_major(_dot(_materialized_transpose(gb), xb)))
  return dx, dw


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def batched_matmul(a: jax.Array, b: jax.Array, compute_dtype: Dtype = jnp.float32,
                   out_dtype: Dtype = jnp.float32) -> jax.Array:
  """[..., M, K] @ [..., K, N] with an fp32 result (on a GPU a bf16 one for bf16 compute and
  `out_dtype`; the caller casts either to out_dtype); bf16 compute keeps the backward dots bf16."""
  if jnp.dtype(compute_dtype) == jnp.bfloat16:
    bf16_result = (jnp.dtype(out_dtype) == jnp.bfloat16
                   and splash_attention.compile_platform() in _BF16_RESULT_PLATFORMS)
    return _bf16_matmul(a.astype(jnp.float32), b.astype(jnp.float32),
                        jnp.bfloat16 if bf16_result else jnp.float32)
  return _dot(a.astype(compute_dtype), b.astype(compute_dtype))


def matmul(x: jax.Array, kernel: jax.Array, compute_dtype: Dtype = jnp.float32,
           out_dtype: Dtype = jnp.float32) -> jax.Array:
  """x[..., in] @ kernel[in, out] on 2-D operands, fp32 output (see batched_matmul for bf16).

  2-D operands: N-d dots cost 1.6x in the backward on CPU (docs/cpu_performance.md). With bf16
  compute the backward is a custom VJP keeping every dot bf16 x bf16 -> fp32.
  """
  y = batched_matmul(x.reshape(-1, x.shape[-1]), kernel, compute_dtype, out_dtype)
  return y.reshape(*x.shape[:-1], kernel.shape[-1])


class Linear(nn.Module):
  """Dense layer with a logically partitioned `[in, out]` kernel (the transpose of torch's `[out, in]`)."""
  features: int
  axes: Axes = ("embed", "mlp")
  use_bias: bool = True
  compute_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.zeros_init()
  # The output's dtype: fp32 (the dot accumulates in fp32 and the bias is added in fp32), or
  # rounded once to bf16, as torch's autocast hands on a Linear's output.
  out_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
        (x.shape[-1], self.features), jnp.float32)
    # Without a bias the GEMM itself rounds to a bf16 out_dtype; a bias is added to the fp32
    # sums first and the sum rounded once, as torch's fused bias epilogue does.
    y = matmul(x, kernel, self.compute_dtype, jnp.float32 if self.use_bias else self.out_dtype)
    if self.use_bias:
      bias = self.param(
          "bias", nn.with_logical_partitioning(self.bias_init, self.axes[-1:]),
          (self.features,), jnp.float32)
      y = y + bias
    return y.astype(self.out_dtype)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up. The VJP keeps only its inputs: autodiff would also save silu(gate), one more
  fp32 pass over the FFN activations (XLA still shares sigmoid(gate) with the forward)."""
  return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
  return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, g):
  gate, up = res
  sig = jax.nn.sigmoid(gate)
  return g * up * sig * (1 + gate * (1 - sig)), g * gate * sig


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  """x * rsqrt(mean(x^2) + eps) in fp32, cast back to the input dtype (the official fallback RMSNorm)."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return y.astype(x.dtype)


class RMSNorm(nn.Module):
  """RMSNorm with a `weight` scale (ones init), as in Lumina / SVG-T2I."""
  eps: float = 1e-5
  axis_name: str | None = "norm"

  @nn.compact
  def __call__(self, x: jax.Array, multiplier: jax.Array | None = None) -> jax.Array:
    """multiplier: an optional factor broadcast against x (adaLN scale, gate). It is folded into
    the weight first, so the backward reduces d_out * x_hat once for both instead of twice."""
    weight = self.param(
        "weight", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
        (x.shape[-1],), jnp.float32)
    if multiplier is not None:
      weight = weight * multiplier
    # Normalized and scaled in fp32, rounded once to x's dtype (a bf16 x stays bf16).
    return (rms_normalize(x.astype(jnp.float32), self.eps) * weight).astype(x.dtype)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """LayerNorm without affine parameters, statistics in fp32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Attention


def key_mask_from_lengths(kv_lengths: jax.Array, num_keys: int) -> jax.Array:
  """[B] right-padded valid lengths -> [B, S] bool key mask."""
  return jnp.arange(num_keys)[None, :] < kv_lengths[:, None]


def _xla_attention(q, k, v, key_mask, scale, logits_soft_cap, extra_mask, compute_dtype):
  b, t, h, d = q.shape
  kv = k.shape[2]
  rep = h // kv
  s = k.shape[1]
  # GQA without materializing repeated K/V: query head h uses kv head h // rep. Both products are
  # canonical [b, kv, M, K] @ [b, kv, K, N] dots (what XLA:CPU's fast path takes).
  qg = q.reshape(b, t, kv, rep, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, rep * t, d)
  logits = batched_matmul(qg, k.transpose(0, 2, 3, 1), compute_dtype)
  logits = logits.reshape(b, kv, rep, t, s) * scale
  if logits_soft_cap is not None:
    logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
  mask = None
  if key_mask is not None:
    mask = key_mask[:, None, None, None, :]
  if extra_mask is not None:
    em = extra_mask.reshape(extra_mask.shape[0], -1, 1, t, extra_mask.shape[-1])
    if em.shape[1] != 1:
      em = extra_mask.reshape(extra_mask.shape[0], kv, rep, t, extra_mask.shape[-1])
    mask = em if mask is None else (mask & em)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  out = batched_matmul(probs.reshape(b, kv, rep * t, s), v.transpose(0, 2, 1, 3), compute_dtype)
  return out.reshape(b, kv, rep, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


# cuDNN's fused attention (jax's own checks): Ampere or later, a head dim that is a multiple of 8
# and at most 128 (256 from Hopper on; 128 holds everywhere), 16-bit inputs.
CUDNN_MIN_CAPABILITY = (8, 0)
CUDNN_MAX_HEAD_DIM = 128
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def auto_backend(head_dim: int, compute_dtype: Dtype, *, plain: bool) -> str:
  """The backend "auto" takes: the fused kernel of the platform this trace compiles for where
  it applies (splash on TPUs; cuDNN on Ampere-or-later GPUs with 16-bit compute, which it would
  otherwise cast fp32 inputs to), else xla. `plain`: only key padding, no soft cap or extra mask."""
  platform = splash_attention.compile_platform()
  if plain and platform == "tpu":
    return "splash"
  if (plain and platform in GPU_PLATFORMS and jnp.dtype(compute_dtype) in _CUDNN_DTYPES
      and head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM and _cuda_capability_ok()):
    return "cudnn"
  return "xla"


def _cuda_capability_ok(device=None) -> bool:
  """Whether `device` (this process's first) is new enough for cuDNN's fused attention; True
  where no device says (a program compiled for a described GPU, without one)."""
  capability = getattr(jax.devices()[0] if device is None else device, "compute_capability", None)
  if not capability:
    return True
  return tuple(int(x) for x in str(capability).split(".")[:2]) >= CUDNN_MIN_CAPABILITY


def _require_platform(backend: str, platforms: Sequence[str]) -> None:
  platform = jax.devices()[0].platform
  if platform not in platforms:
    raise RuntimeError(
        f"attention backend {backend!r} needs a {'/'.join(platforms)} device but this process runs on "
        f"{platform!r}; set config.model.attention_backend='xla' (works everywhere).")


def _cudnn_attention(q, k, v, kv_lengths, scale, compute_dtype):
  _require_platform("cudnn", GPU_PLATFORMS)
  dtype = jnp.bfloat16 if compute_dtype == jnp.float32 else compute_dtype

  def kernel(q, k, v, lengths):
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, query_seq_lengths=None, key_value_seq_lengths=lengths,
        implementation="cudnn")

  run = kernel_residuals.with_named_residuals(kernel, n_rest=1)
  return run(q.astype(dtype), k.astype(dtype), v.astype(dtype), kv_lengths).astype(jnp.float32)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_lengths: jax.Array | None = None,
              backend: str = "xla", scale: float | None = None, logits_soft_cap: float | None = None,
              extra_mask: jax.Array | None = None, compute_dtype: Dtype = jnp.float32) -> jax.Array:
  """Multi-head attention with GQA and right-padded key masks; the one entry point for every model.

  q: [B, T, H, D]; k, v: [B, S, KV, D] with H % KV == 0; kv_lengths: [B] number of valid (leading)
  keys, or None for no padding. extra_mask: optional bool [B, 1 or H, T, S] (causal / sliding window),
  xla backend only. backend: one of ATTENTION_BACKENDS (splash: svg_jax/models/splash_attention.py).
  Returns [B, T, H, D] fp32.
  """
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}")
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if backend == "auto":
    backend = auto_backend(q.shape[-1], compute_dtype,
                           plain=logits_soft_cap is None and extra_mask is None)
  if backend == "xla":
    key_mask = None if kv_lengths is None else key_mask_from_lengths(kv_lengths, k.shape[1])
    return _xla_attention(q, k, v, key_mask, scale, logits_soft_cap, extra_mask, compute_dtype)
  if backend not in ATTENTION_BACKENDS:
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
  if logits_soft_cap is not None or extra_mask is not None:
    raise ValueError(f"attention backend {backend!r} supports only key-padding masks; use 'xla'")
  if backend == "cudnn":
    return _cudnn_attention(q, k, v, kv_lengths, scale, compute_dtype)
  return splash_attention.splash_attention(q, k, v, kv_lengths, scale, compute_dtype)


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings


def lumina_rope_tables(axes_dims: Sequence[int], axes_lens: Sequence[int], theta: float = 10000.0
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per-axis (cos, sin) tables [len_i, dim_i/2], built the official way.

  Angles are computed in float64 on the host and rounded to float32 before cos/sin (docs/reference.md §1.3);
  the tables are host constants, never parameters.
  """
  tables = []
  for d, n in zip(axes_dims, axes_lens):
    freqs = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64)[: d // 2] / d)
    angles = np.outer(np.arange(n, dtype=np.float64), freqs).astype(np.float32)
    tables.append((np.cos(angles), np.sin(angles)))
  return tables


def gather_rope(tables: list[tuple[np.ndarray, np.ndarray]], position_ids: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """position_ids [..., n_axes] int -> (cos, sin) [..., sum(dim_i)/2], axes concatenated in order."""
  cos = [jnp.asarray(c)[position_ids[..., i]] for i, (c, _) in enumerate(tables)]
  sin = [jnp.asarray(s)[position_ids[..., i]] for i, (_, s) in enumerate(tables)]
  return jnp.concatenate(cos, axis=-1), jnp.concatenate(sin, axis=-1)


def apply_interleaved_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate adjacent pairs (2i, 2i+1) as complex numbers (GPT-J / Lumina style), in fp32.

  x: [B, T, H, D]; cos, sin: [B, T, D/2].
  """
  x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  re, im = x32[..., 0], x32[..., 1]
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  out = jnp.stack([re * c - im * s, re * s + im * c], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def apply_half_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate element i with element i + D/2 (NeoX / DINOv3 style), in fp32.

  x: [B, T, H, D]; cos, sin: [T, D] (already tiled to the full head dim).
  """
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos[None, :, None, :] + rotated * sin[None, :, None, :]).astype(x.dtype)
