"""SVG-T2I pixel decoder: the LDM convolutional `Decoder` with its always-on lowest-level attention.

Maps channel-last DINOv3 latents [B, h, w, z_channels] to images [B, 16h, 16w, out_ch] in about
[-1, 1] (docs/reference.md §3.1; 2**(len(ch_mult)-1) upsampling in general). It computes what the official
`ldm.modules.diffusionmodules.model.Decoder` of SVG-T2I computes, which equals
`diffusers.models.autoencoders.vae.Decoder` with an `AttnUpDecoderBlock2D` as the first up block
(docs/equivalence/autoencoder.md §2):

  conv_in 3x3 -> mid (ResnetBlock, AttnBlock, ResnetBlock)
  -> for level L = n-1 .. 0: num_res_blocks+1 ResnetBlocks (channels ch*ch_mult[L]), each
     followed by an AttnBlock when L == n-1 (the SVG-T2I change: whatever attn_resolutions says),
     then nearest x2 upsample + conv 3x3 when L > 0
  -> GroupNorm, swish, conv_out 3x3.

Not ported (off in every released config): `tanh_out`, `give_pre_end`, `use_conv_shortcut` (the 3x3
shortcut variant) and the time embedding (temb_ch = 0).

Parameter tree (names mirror the official state dict with '.' -> '_' at the top level, so the key
map in `svg_jax/convert/decoder.py` stays obvious):
  conv_in, mid_block_1, mid_attn_1, mid_block_2, up_{L}_block_{j}, up_{L}_attn_{j} (L = n-1 only),
  up_{L}_upsample (L >= 1), norm_out, conv_out.
  ResnetBlock: norm1, conv1, norm2, conv2, [nin_shortcut];  AttnBlock: norm, q, k, v, proj_out;
  Upsample: conv.  3x3 convs: {kernel [3, 3, in, out] (HWIO), bias};  1x1 convs (nin_shortcut and
  the attention projections) are matmuls: {kernel [in, out], bias};  GroupNorm: {scale, bias}.

Logical axis names: 3x3 kernels ("conv_h", "conv_w", "conv_in", "conv_out"); 1x1 kernels
("conv_in", "conv_out"); biases ("conv_out",); GroupNorm scale/bias ("norm",).

Numerics: params fp32; conv and matmul inputs in `compute_dtype` with fp32 accumulation and fp32
outputs (the activations between layers stay fp32); GroupNorm statistics (two-pass variance) and the
softmax in fp32.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from svg_jax.input_errors import InputError
from svg_jax.models import config_dict, layers

CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")
DENSE_AXES = ("conv_in", "conv_out")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Decoder hyperparameters; defaults are the released autoencoder ddconfig (docs/reference.md §3.1)."""
  z_channels: int = 384
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  out_ch: int = 3
  # The official Normalize() hard-codes 32 groups; small test decoders need fewer.
  norm_groups: int = 32
  norm_eps: float = 1e-6
  dropout: float = 0.0
  # Implementation choices (no effect on the function computed).
  compute_dtype: str = "float32"
  attention_backend: str = "xla"
  remat: bool = False  # rematerialize each ResnetBlock / AttnBlock in the backward pass

  @property
  def num_levels(self) -> int:
    return len(self.ch_mult)

  def level_channels(self, level: int) -> int:
    """Output channels of up level `level` (official numbering: 0 = full resolution)."""
    return self.ch * self.ch_mult[level]

  @property
  def upsample_factor(self) -> int:
    return 2 ** (self.num_levels - 1)

  def validate(self) -> None:
    problems = []
    if not self.ch_mult:
      problems.append("ch_mult is empty")
    if self.num_res_blocks < 0:
      problems.append(f"num_res_blocks {self.num_res_blocks} < 0")
    for c in sorted({self.ch * m for m in self.ch_mult}):
      if c % self.norm_groups:
        problems.append(f"channels {c} not divisible by norm_groups {self.norm_groups}")
    if self.attention_backend not in layers.ATTENTION_BACKENDS:
      problems.append(f"attention_backend {self.attention_backend!r} not in "
                      f"{layers.ATTENTION_BACKENDS}")
    if problems:
      raise InputError("invalid Decoder config: " + "; ".join(problems))

  @classmethod
  def from_dict(cls, d: Any) -> "DecoderConfig":
    return config_dict.from_dict(cls, d, "Decoder", ("ch_mult",))


def _dtype(name: str) -> Any:
  return jnp.dtype(name)


# torch's default Conv2d weight init (kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))).
_conv_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def group_norm(x: jax.Array, groups: int, eps: float) -> jax.Array:
  """GroupNorm without affine over NHWC; fp32 statistics with a two-pass variance; returns fp32."""
  b, h, w, c = x.shape
  if c % groups:
    raise ValueError(f"GroupNorm: {c} channels not divisible by {groups} groups")
  g = x.astype(jnp.float32).reshape(b, h, w, groups, c // groups)
  mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
  centered = g - mean
  var = jnp.mean(jnp.square(centered), axis=(1, 2, 4), keepdims=True)
  return (centered * jax.lax.rsqrt(var + eps)).reshape(b, h, w, c)


class GroupNorm(nn.Module):
  """Affine GroupNorm (torch semantics: per-channel scale/bias after per-group normalization)."""
  groups: int = 32
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        (c,), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                      (c,), jnp.float32)
    return group_norm(x, self.groups, self.eps) * scale + bias


class Conv3x3(nn.Module):
  """3x3 'same' convolution, NHWC x HWIO, fp32 accumulation."""
  features: int
  compute_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(_conv_kernel_init, CONV_AXES),
                        (3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ("conv_out",)),
                      (self.features,), jnp.float32)
    y = jax.lax.conv_general_dilated(
        x.astype(self.compute_dtype), kernel.astype(self.compute_dtype), window_strides=(1, 1),
        padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=jnp.float32)
    return y + bias


def _dense(features: int, compute_dtype: Any, name: str) -> layers.Linear:
  """A 1x1 convolution as a 2-D matmul over the flattened pixels."""
  return layers.Linear(features, DENSE_AXES, True, compute_dtype,
                       kernel_init=_conv_kernel_init, name=name)


class ResnetBlock(nn.Module):
  """GN, swish, conv3x3, GN, swish, dropout, conv3x3, plus a (1x1 when channels change) shortcut."""
  out_channels: int
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    cfg = self.cfg
    dt = _dtype(cfg.compute_dtype)
    h = nn.silu(GroupNorm(cfg.norm_groups, cfg.norm_eps, name="norm1")(x))
    h = Conv3x3(self.out_channels, dt, name="conv1")(h)
    h = nn.silu(GroupNorm(cfg.norm_groups, cfg.norm_eps, name="norm2")(h))
    if cfg.dropout > 0.0:
      h = nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
    h = Conv3x3(self.out_channels, dt, name="conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = _dense(self.out_channels, dt, "nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all H*W positions, scale 1/sqrt(C), with a residual."""
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    del deterministic  # no dropout in the official AttnBlock
    cfg = self.cfg
    dt = _dtype(cfg.compute_dtype)
    b, hh, ww, c = x.shape
    h = GroupNorm(cfg.norm_groups, cfg.norm_eps, name="norm")(x).reshape(b, hh * ww, c)
    q = _dense(c, dt, "q")(h).reshape(b, hh * ww, 1, c)
    k = _dense(c, dt, "k")(h).reshape(b, hh * ww, 1, c)
    v = _dense(c, dt, "v")(h).reshape(b, hh * ww, 1, c)
    o = layers.attention(q, k, v, backend=cfg.attention_backend, scale=c ** -0.5, compute_dtype=dt)
    o = _dense(c, dt, "proj_out")(o.reshape(b, hh * ww, c))
    return x + o.reshape(b, hh, ww, c)


class Upsample(nn.Module):
  """Nearest-neighbour x2 (a repeat along H and W), then conv 3x3."""
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return Conv3x3(x.shape[-1], _dtype(self.cfg.compute_dtype), name="conv")(x)


class Decoder(nn.Module):
  """The SVG-T2I pixel decoder.

  Args (call):
    z: [B, h, w, z_channels] latents (channel-last; the official model takes NCHW).
    deterministic: False enables dropout (needs a 'dropout' rng; the released config has dropout 0).
  Returns [B, h * 2**(n-1), w * 2**(n-1), out_ch] fp32 images in about [-1, 1].
  """
  cfg: DecoderConfig = DecoderConfig()

  @nn.compact
  def __call__(self, z: jax.Array, deterministic: bool = True) -> jax.Array:
    cfg = self.cfg
    cfg.validate()
    if z.ndim != 4 or z.shape[-1] != cfg.z_channels:
      raise ValueError(f"Decoder expects latents [B, h, w, {cfg.z_channels}], got {z.shape}")
    dt = _dtype(cfg.compute_dtype)
    resnet_cls = nn.remat(ResnetBlock, static_argnums=(2,)) if cfg.remat else ResnetBlock
    attn_cls = nn.remat(AttnBlock, static_argnums=(2,)) if cfg.remat else AttnBlock
    n = cfg.num_levels

    h = Conv3x3(cfg.level_channels(n - 1), dt, name="conv_in")(z)
    h = resnet_cls(cfg.level_channels(n - 1), cfg, name="mid_block_1")(h, deterministic)
    h = attn_cls(cfg, name="mid_attn_1")(h, deterministic)
    h = resnet_cls(cfg.level_channels(n - 1), cfg, name="mid_block_2")(h, deterministic)
    for level in reversed(range(n)):
      for j in range(cfg.num_res_blocks + 1):
        h = resnet_cls(cfg.level_channels(level), cfg, name=f"up_{level}_block_{j}")(
            h, deterministic)
        if level == n - 1:  # SVG-T2I: attention at the lowest level, whatever attn_resolutions says
          h = attn_cls(cfg, name=f"up_{level}_attn_{j}")(h, deterministic)
      if level != 0:
        h = Upsample(cfg, name=f"up_{level}_upsample")(h)
    h = nn.silu(GroupNorm(cfg.norm_groups, cfg.norm_eps, name="norm_out")(h))
    return Conv3x3(cfg.out_ch, dt, name="conv_out")(h)
