"""Splash attention: JAX's Pallas TPU flash-attention kernel behind `attention(backend="splash")`.

The kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) works on one example at a time,
q [H, T, D] and k, v [KV, S, D]; with H a multiple of KV it is grouped-query attention natively
(query head h reads kv head h // (H / KV)), so K/V are never repeated. Our key-padding mask
becomes segment ids: every query is in segment 1, valid keys in segment 1 and padded keys in
segment 0, so a padded key gets no weight, exactly as the `xla` backend's mask.

Shapes: the kernel's blocks are multiples of 128 tokens, so T and S are padded here to the next
multiple of 128 (the extra keys are masked like caption padding, the extra query rows are dropped);
the blocks are the largest of 512 / 256 / 128 that divides the padded length.

Sharding: under a mesh the kernel runs inside `jax.shard_map`, each device on its own examples and
heads, with the mesh axes that the logical rules give `activation_batch` and `heads` / `kv_heads`
(the same rules the rest of the model uses). A head split that does not divide both H and KV, or a
batch split that does not divide B, falls back to replication on that axis.

Platforms: on TPU the kernel is compiled by Mosaic; on CPU it runs in Pallas interpret mode (same
kernel code, for the tests; slow, a warning says so once); anything else is an error. The platform
is the current mesh's (an ahead-of-time compile for a TPU topology runs in a CPU-only process).

Numerics: q is scaled in fp32, then q, k, v are cast to the compute dtype; the kernel accumulates
in fp32 (softmax statistics included) and returns the compute dtype, cast back to fp32 here.
"""
from __future__ import annotations

import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

from svg_jax.models import kernel_residuals
from svg_jax.utils.rounding import round_up

_warned: list = []  # the CPU interpret-mode warning is logged once per process
LANES = 128  # the kernel's block sizes must be multiples of this (TPU vector lanes)
BLOCK_CHOICES = (512, 256, 128)


def padded_length(n: int) -> int:
  return round_up(n, LANES)


def _block(n: int) -> int:
  return next(b for b in BLOCK_CHOICES if n % b == 0)


def compile_platform() -> str:
  """The platform this trace compiles for: the current mesh's devices, else the default."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else jax.devices()[0].platform


def make_kernel(heads: int, t: int, s: int, *, interpret: bool):
  """The splash kernel for `heads` query heads, T queries and S keys (both multiples of 128)."""
  bq, bkv = _block(t), _block(s)
  blocks = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                         block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                         block_q_dq=bq, block_kv_dq=bkv)
  # Every head sees every key (the padding is in the segment ids): the kernel keeps one copy.
  mask = sm.MultiHeadMask([sm.FullMask((t, s)) for _ in range(heads)])
  return sk.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                            interpret=interpret)


def _spec_axes(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _fit(entry: Any, mesh, *sizes: int) -> Any:
  """`entry` (mesh axes of one array axis) if their product divides every size, else None."""
  n = 1
  for a in _spec_axes(entry):
    n *= mesh.shape[a]
  return entry if all(size % n == 0 for size in sizes) else None


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_lengths: jax.Array | None,
                     scale: float, compute_dtype: Any = jnp.float32) -> jax.Array:
  """q [B, T, H, D], k / v [B, S, KV, D], kv_lengths [B] valid leading keys (None: all).

  Matmul inputs are in `compute_dtype` (the kernel accumulates in fp32); returns [B, T, H, D]
  fp32."""
  platform = compile_platform()
  if platform not in ("tpu", "cpu"):
    raise RuntimeError(f"attention backend 'splash' needs a TPU (or CPU, interpreted) but this "
                       f"trace compiles for {platform!r}; set config.model.attention_backend="
                       "'xla' (works everywhere) or 'cudnn' on GPUs.")
  b, t, h, d = q.shape
  s, kv = k.shape[1], k.shape[2]
  tp, sp = padded_length(t), padded_length(s)
  lengths = jnp.full((b,), s, jnp.int32) if kv_lengths is None else kv_lengths.astype(jnp.int32)
  kv_seg = (jnp.arange(sp)[None, :] < lengths[:, None]).astype(jnp.int32)
  q_seg = jnp.ones((b, tp), jnp.int32)
  # Head-major for the kernel, scaled (the kernel takes raw logits), padded on the sequence axis.
  qh = jnp.swapaxes((q.astype(jnp.float32) * scale).astype(compute_dtype), 1, 2)
  kh = jnp.swapaxes(k.astype(compute_dtype), 1, 2)
  vh = jnp.swapaxes(v.astype(compute_dtype), 1, 2)
  qh = jnp.pad(qh, ((0, 0), (0, 0), (0, tp - t), (0, 0)))
  kh = jnp.pad(kh, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
  vh = jnp.pad(vh, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
  interpret = platform == "cpu"
  if interpret and not _warned:
    _warned.append(True)
    logging.getLogger(__name__).warning(
        "attention backend 'splash' on CPU runs the TPU kernel in Pallas interpret mode (slow; "
        "for tests); use 'xla' or 'auto' to train on CPU")

  precision = "highest" if jnp.dtype(compute_dtype) == jnp.float32 else "default"

  def attend(qh, kh, vh, q_seg, kv_seg, kernel):
    one = lambda qq, kk, vv, qs, ks: kernel(qq, kk, vv, segment_ids=sk.SegmentIds(qs, ks))  # noqa: E731
    return jax.vmap(one)(qh, kh, vh, q_seg, kv_seg)

  def local(qh, kh, vh, q_seg, kv_seg):
    # The kernel (a pytree of its mask's block tables, arrays made in this trace) is an argument
    # of the custom_vjp, not a closure: a custom_vjp closing over this trace's arrays leaks them
    # under remat, and the compiled step then refuses to run ("unexpected tracer").
    kernel = make_kernel(qh.shape[1], tp, sp, interpret=interpret)
    # The kernel's dots take the ambient matmul precision: full fp32 passes for fp32 compute, the
    # MXU's native bf16 otherwise (Mosaic refuses bf16 operands at fp32 precision, which a global
    # jax_default_matmul_precision=highest asks for).
    run = kernel_residuals.with_named_residuals(attend, n_rest=3, precision=precision)
    return run(qh, kh, vh, q_seg, kv_seg, kernel)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    out = local(qh, kh, vh, q_seg, kv_seg)
  else:
    batch_entry, heads_entry = nn.logical_to_mesh_axes(("activation_batch", "heads"))
    kv_entry, = nn.logical_to_mesh_axes(("kv_heads",))
    batch_entry = _fit(batch_entry, mesh, b)
    # q and kv heads must be split alike, or a device would hold query heads without their kv head.
    heads_entry = heads_entry if heads_entry == kv_entry else None
    heads_entry = _fit(heads_entry, mesh, h, kv)
    qkv_spec = P(batch_entry, heads_entry, None, None)
    seg_spec = P(batch_entry, None)
    out = jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,) * 2,
                        out_specs=qkv_spec, check_vma=False)(qh, kh, vh, q_seg, kv_seg)
  return jnp.swapaxes(out[:, :, :t], 1, 2).astype(jnp.float32)
