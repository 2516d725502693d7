"""DINOv3 ViT encoder (frozen), the feature extractor whose patch tokens are SVG-T2I's latent space.

Computes what the official `dinov3_vits16plus` `forward_features(x)["x_norm_patchtokens"]` computes
(docs/reference.md §2.1-2.2; equal to `transformers.DINOv3ViTModel`, docs/equivalence/autoencoder.md §1):
  * patch embedding: conv kernel = stride = patch (done here as patchify + one 2-D matmul),
  * tokens [CLS, registers, patches]; no absolute position embedding,
  * pre-norm blocks x += ls1 * attn(norm1(x)); x += ls2 * swiglu(norm2(x)), LayerNorm eps 1e-5,
  * axial RoPE on patch tokens only: per-axis normalized patch-centre coordinates in (-1, 1),
    periods base^(k / (head_dim / 4)), angles [h | w] tiled twice, half rotation (i <-> i + D/2),
  * a final LayerNorm over all tokens.
Eval mode only (frozen encoder): no dropout, no drop-path, no RoPE coordinate augmentation.
Input images are channel-last and already ImageNet-normalized (see svg_jax/data/images.py).
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


@dataclasses.dataclass(frozen=True)
class DINOv3Config:
  """Architecture; defaults are ViT-S/16+ exactly as the official `dinov3_vits16plus` (docs/reference.md §2.1)."""
  patch_size: int = 16
  in_channels: int = 3
  dim: int = 384
  depth: int = 12
  num_heads: int = 6
  # SwiGLU width: int(int(384 * 6) * 2 / 3) = 1536 for ViT-S/16+ (already a multiple of 8).
  ffn_hidden: int = 1536
  ffn_bias: bool = True
  num_register_tokens: int = 4
  # LayerScale init value (only an init; loaded weights override it); None = no LayerScale.
  layerscale_init: float | None = 1e-5
  ln_eps: float = 1e-5
  rope_base: float = 100.0
  qkv_bias: bool = True
  proj_bias: bool = True
  # Implementation choices (no effect on the function computed).
  compute_dtype: str = "float32"
  attention_backend: str = "xla"
  scan_layers: bool = True

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  @property
  def num_prefix_tokens(self) -> int:
    return 1 + self.num_register_tokens

  def validate(self) -> None:
    problems = []
    if self.dim % self.num_heads:
      problems.append(f"dim {self.dim} not divisible by num_heads {self.num_heads}")
    elif self.head_dim % 4:
      # RoPE splits the head into 2 axes x (cos, sin) halves: head_dim / 4 periods per axis.
      problems.append(f"head_dim {self.head_dim} must be a multiple of 4 for axial RoPE")
    if self.attention_backend not in layers.ATTENTION_BACKENDS:
      problems.append(f"attention_backend {self.attention_backend!r} not in "
                      f"{layers.ATTENTION_BACKENDS}")
    if problems:
      raise InputError("invalid DINOv3 config: " + "; ".join(problems))

  @classmethod
  def from_dict(cls, d: Any) -> "DINOv3Config":
    return config_dict.from_dict(cls, d, "DINOv3")


def rope_periods(cfg: DINOv3Config) -> np.ndarray:
  """The official `rope_embed.periods` buffer: base^(2k / (head_dim/2)), k < head_dim/4, in fp32.

  The exponent is formed in fp32 like torch's; the power is taken in fp64 and rounded once, which
  reproduces torch's fp32 result bit for bit (numpy's fp32 pow is off by 1 ulp for some k).
  """
  n = cfg.head_dim // 4
  exponents = np.float32(2) * np.arange(n, dtype=np.float32) / np.float32(cfg.head_dim // 2)
  return (np.float64(cfg.rope_base) ** exponents.astype(np.float64)).astype(np.float32)


def rope_tables(cfg: DINOv3Config, grid_h: int, grid_w: int) -> tuple[np.ndarray, np.ndarray]:
  """(cos, sin) [grid_h * grid_w, head_dim] for row-major patches, built on the host in fp32.

  Coordinates are patch centres normalized per axis ("separate"): 2 (r + 0.5) / H - 1, so the
  table depends only on the grid shape; angles = 2 pi coord / period laid out [h | w], tiled x2.
  """
  periods = rope_periods(cfg)
  ch = np.arange(0.5, grid_h, dtype=np.float32) / np.float32(grid_h)
  cw = np.arange(0.5, grid_w, dtype=np.float32) / np.float32(grid_w)
  coords = np.stack(np.meshgrid(ch, cw, indexing="ij"), axis=-1).reshape(-1, 2)
  coords = np.float32(2) * coords - np.float32(1)
  angles = np.float32(2 * math.pi) * coords[:, :, None] / periods[None, None, :]
  angles = np.tile(angles.reshape(coords.shape[0], -1), (1, 2)).astype(np.float64)
  # The fp32 angles equal the official ones bit for bit; cos/sin are rounded once from fp64.
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class LayerNorm(nn.Module):
  """LayerNorm with affine `scale`/`bias`; two-pass fp32 statistics (torch semantics)."""
  eps: float

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(
        nn.initializers.ones_init(), ("norm",)), (d,), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ("norm",)), (d,), jnp.float32)
    return layers.layer_norm(x.astype(jnp.float32), self.eps) * scale + bias


class Attention(nn.Module):
  """Fused-qkv self-attention; RoPE on the patch tokens only (the prefix tokens are not rotated)."""
  cfg: DINOv3Config

  @nn.compact
  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    cfg = self.cfg
    b, t, _ = x.shape
    dt = jnp.dtype(cfg.compute_dtype)
    # The official qkv is a LinearKMaskedBias whose bias is `bias * bias_mask` (mask is a buffer).
    # We store that product, the effective bias, as our `bias`: it is the only quantity the
    # forward pass sees, so no mask buffer is needed here. convert/dinov3.py checks the k slice.
    qkv = layers.Linear(3 * cfg.dim, ("embed", "qkv"), cfg.qkv_bias, dt, name="qkv")(x)
    q, k, v = jnp.split(qkv.reshape(b, t, 3, cfg.num_heads, cfg.head_dim), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    p = cfg.num_prefix_tokens
    q = jnp.concatenate([q[:, :p], layers.apply_half_rope(q[:, p:], cos, sin)], axis=1)
    k = jnp.concatenate([k[:, :p], layers.apply_half_rope(k[:, p:], cos, sin)], axis=1)
    out = layers.attention(q, k, v, backend=cfg.attention_backend, compute_dtype=dt)
    out = out.reshape(b, t, cfg.dim)
    return layers.Linear(cfg.dim, ("heads", "embed"), cfg.proj_bias, dt, name="proj")(out)


class SwiGLU(nn.Module):
  """w3(silu(w1 x) * w2 x) with DINOv3 naming: w1 = gate, w2 = up, w3 = down."""
  cfg: DINOv3Config

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    dt = jnp.dtype(cfg.compute_dtype)
    gate = layers.Linear(cfg.ffn_hidden, ("embed", "mlp"), cfg.ffn_bias, dt, name="w1")(x)
    up = layers.Linear(cfg.ffn_hidden, ("embed", "mlp"), cfg.ffn_bias, dt, name="w2")(x)
    return layers.Linear(cfg.dim, ("mlp", "embed"), cfg.ffn_bias, dt, name="w3")(nn.silu(gate) * up)


class Block(nn.Module):
  """Pre-norm transformer block with LayerScale on both residual branches."""
  cfg: DINOv3Config

  def _layerscale(self, name: str) -> jax.Array | float:
    cfg = self.cfg
    if cfg.layerscale_init is None:
      return 1.0
    return self.param(name, nn.with_logical_partitioning(
        nn.initializers.constant(cfg.layerscale_init), ("norm",)), (cfg.dim,), jnp.float32)

  @nn.compact
  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    cfg = self.cfg
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    h = Attention(cfg, name="attn")(LayerNorm(cfg.ln_eps, name="norm1")(x), cos, sin)
    x = x + self._layerscale("ls1") * h
    h = SwiGLU(cfg, name="mlp")(LayerNorm(cfg.ln_eps, name="norm2")(x))
    return x + self._layerscale("ls2") * h


class _ScanBlock(nn.Module):
  """Block in the (carry, broadcast...) -> (carry, None) form `nn.scan` wants."""
  cfg: DINOv3Config

  @nn.compact
  def __call__(self, x, cos, sin):
    return Block(self.cfg, name="block")(x, cos, sin), None


def patchify(images: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C] -> [B, H/p, W/p, p*p*C], vector ordered (ph, pw, C) = a flattened HWIO kernel row.

  Like torch's strided conv, trailing rows/columns that do not fill a patch are dropped.
  """
  b, hh, ww, c = images.shape
  gh, gw = hh // p, ww // p
  x = images[:, :gh * p, :gw * p].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh, gw, p * p * c)


class PatchEmbed(nn.Module):
  """Conv with kernel = stride = patch as patchify + one 2-D matmul (faster than a conv on CPU).

  The kernel is stored HWIO [p, p, C, dim], so torch's OIHW weight converts with one transpose, and
  its flattening (ph, pw, C) matches `patchify`.
  """
  cfg: DINOv3Config

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.cfg
    p, d = cfg.patch_size, cfg.dim
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
        (None, None, None, "embed")), (p, p, cfg.in_channels, d), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), ("embed",)), (d,), jnp.float32)
    x = patchify(images.astype(jnp.float32), p)
    return layers.matmul(x, kernel.reshape(-1, d), jnp.dtype(cfg.compute_dtype)) + bias


class DINOv3ViT(nn.Module):
  """DINOv3 ViT. Call with images [B, H, W, C] (ImageNet-normalized, channel-last).

  Returns the final-norm patch tokens [B, H/p, W/p, dim] (the SVG-T2I latent before its
  per-channel normalization), or with `return_all_tokens` the final-norm sequence
  [B, 1 + registers + (H/p)(W/p), dim] ordered [CLS, registers, row-major patches].
  `masks` [B, H/p, W/p] bool (optional) replaces those patch embeddings by `mask_token` before
  the prefix tokens are added (the official / HF `bool_masked_pos`; unused by SVG-T2I).
  """
  cfg: DINOv3Config = DINOv3Config()

  @nn.compact
  def __call__(self, images: jax.Array, masks: jax.Array | None = None,
               return_all_tokens: bool = False) -> jax.Array:
    cfg = self.cfg
    cfg.validate()
    p, d = cfg.patch_size, cfg.dim
    b = images.shape[0]
    if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
      raise ValueError(f"expected images [B, H, W, {cfg.in_channels}], got {images.shape}")
    gh, gw = images.shape[1] // p, images.shape[2] // p
    if gh == 0 or gw == 0:
      raise ValueError(f"image {images.shape[1]}x{images.shape[2]} smaller than one {p}px patch")

    x = PatchEmbed(cfg, name="patch_embed")(images)  # [B, gh, gw, d]
    x = x.reshape(b, gh * gw, d)

    token_init = nn.initializers.normal(0.02)
    cls = self.param("cls_token", nn.with_logical_partitioning(token_init, (None, "embed")),
                     (1, d), jnp.float32)
    prefix = [cls]
    if cfg.num_register_tokens:
      prefix.append(self.param("register_tokens", nn.with_logical_partitioning(
          token_init, (None, "embed")), (cfg.num_register_tokens, d), jnp.float32))
    # Part of both reference state dicts (and of the 28,697,472 parameter count); only used when
    # `masks` is given.
    mask_token = self.param("mask_token", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), (None, "embed")), (1, d), jnp.float32)
    if masks is not None:
      x = jnp.where(masks.reshape(b, gh * gw, 1), mask_token[None], x)
    prefix = jnp.broadcast_to(jnp.concatenate(prefix, axis=0)[None], (b, cfg.num_prefix_tokens, d))
    x = jnp.concatenate([prefix, x], axis=1)

    cos, sin = (jnp.asarray(a) for a in rope_tables(cfg, gh, gw))
    if cfg.scan_layers:
      stack = nn.scan(_ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=cfg.depth,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(cfg, name="blocks")(x, cos, sin)
    else:
      for i in range(cfg.depth):
        x = Block(cfg, name=f"blocks_{i}")(x, cos, sin)

    x = LayerNorm(cfg.ln_eps, name="norm")(x)
    if return_all_tokens:
      return x
    return x[:, cfg.num_prefix_tokens:].reshape(b, gh, gw, d)


def count_params(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def abstract_params(cfg: DINOv3Config = DINOv3Config()):
  """Parameter shapes via jax.eval_shape (nothing is allocated), unboxed."""
  model = DINOv3ViT(cfg)
  x = jax.ShapeDtypeStruct((1, cfg.patch_size, cfg.patch_size, cfg.in_channels), jnp.float32)
  init = lambda images: nn.unbox(model.init(jax.random.PRNGKey(0), images)["params"])  # noqa: E731
  return jax.eval_shape(init, x)
