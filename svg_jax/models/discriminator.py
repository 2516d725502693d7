"""PatchGAN discriminator of SVG-T2I's decoder training: taming-transformers' NLayerDiscriminator.

docs/reference.md §3.3: 3 layers, BatchNorm, weights_init N(0, 0.02). The network (ndf = 64, NHWC here):
  conv 4x4 s2 p1 (3 -> ndf, bias), LeakyReLU(0.2)
  for n = 1 .. n_layers-1: conv 4x4 s2 p1 (ndf*min(2^(n-1), 8) -> ndf*min(2^n, 8), no bias),
                           BatchNorm, LeakyReLU(0.2)
  conv 4x4 s1 p1 (-> ndf*min(2^n_layers, 8), no bias), BatchNorm, LeakyReLU(0.2)
  conv 4x4 s1 p1 (-> 1, bias)                                   -> patch logits [B, h', w', 1]
Init (taming `weights_init`): conv kernels N(0, 0.02), BatchNorm scale N(1, 0.02) and bias 0; the
two conv biases keep torch's default U(+-1/sqrt(fan_in)).

BatchNorm: torch semantics (the discriminator always runs in train mode in the official loss):
normalize with the batch's own mean and biased variance (eps 1e-5), and update running averages
(momentum 0.1, unbiased variance) kept in the mutable `batch_stats` collection; call with
`train=False` to use the running averages instead. Under a sharded jit the batch statistics are over
the global batch (torch SyncBatchNorm); official DDP normalizes per GPU, which differs only in which
samples share statistics.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from svg_jax.input_errors import InputError
from svg_jax.models import config_dict

CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
  in_channels: int = 3
  ndf: int = 64
  n_layers: int = 3
  bn_eps: float = 1e-5
  bn_momentum: float = 0.1  # torch convention: running = (1 - m) * running + m * batch
  leaky_slope: float = 0.2

  def channels(self) -> list[int]:
    """Output channels of the n_layers + 2 convolutions."""
    out = [self.ndf]
    out += [self.ndf * min(2 ** n, 8) for n in range(1, self.n_layers + 1)]
    return out + [1]

  def validate(self) -> None:
    problems = config_dict.whole_number_problems(self, dict(in_channels=1, ndf=1, n_layers=1))
    if not self.bn_eps > 0:
      problems.append(f"bn_eps must be > 0, got {self.bn_eps}")
    if not 0 <= self.bn_momentum <= 1:
      problems.append(f"bn_momentum must be in [0, 1], got {self.bn_momentum}")
    if not self.leaky_slope >= 0:
      problems.append(f"leaky_slope must be >= 0, got {self.leaky_slope}")
    if problems:
      raise InputError("invalid discriminator config: " + "; ".join(problems))

  @classmethod
  def from_dict(cls, d: Any) -> "DiscriminatorConfig":
    return config_dict.from_dict(cls, d, "discriminator")


def _torch_bias_init(fan_in: int):
  bound = fan_in ** -0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Conv4x4(nn.Module):
  """4x4 convolution with padding 1 and the given stride, NHWC x HWIO, fp32."""
  features: int
  stride: int
  use_bias: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                               CONV_AXES),
                        (4, 4, cin, self.features), jnp.float32)
    y = jax.lax.conv_general_dilated(
        x.astype(jnp.float32), kernel, window_strides=(self.stride, self.stride),
        padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=jnp.float32)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(_torch_bias_init(16 * cin),
                                                             ("conv_out",)),
                        (self.features,), jnp.float32)
      y = y + bias
    return y


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm2d over NHWC (see the module docstring)."""
  eps: float = 1e-5
  momentum: float = 0.1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(
        lambda k, s: 1.0 + 0.02 * jax.random.normal(k, s, jnp.float32), ("norm",)), (c,))
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ("norm",)), (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", nn.with_logical_partitioning(
        lambda s: jnp.zeros(s, jnp.float32), ("norm",)), (c,))
    ra_var = self.variable("batch_stats", "var", nn.with_logical_partitioning(
        lambda s: jnp.ones(s, jnp.float32), ("norm",)), (c,))
    if train:
      mean = jnp.mean(x, axis=(0, 1, 2))
      var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
      if not self.is_initializing():
        n = x.shape[0] * x.shape[1] * x.shape[2]
        m = self.momentum
        unbiased = var * (n / max(n - 1, 1))
        ra_mean.value = (1 - m) * ra_mean.value + m * jax.lax.stop_gradient(mean)
        ra_var.value = (1 - m) * ra_var.value + m * jax.lax.stop_gradient(unbiased)
    else:
      mean, var = ra_mean.value, ra_var.value
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


class NLayerDiscriminator(nn.Module):
  """Images [B, H, W, C] in about [-1, 1] -> patch logits [B, h', w', 1] (fp32).

  With `train=True` (the loss always uses it) call `apply(..., mutable=["batch_stats"])`.
  """
  cfg: DiscriminatorConfig = DiscriminatorConfig()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    cfg = self.cfg
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
      raise ValueError(f"discriminator expects images [B, H, W, {cfg.in_channels}], got "
                       f"{x.shape}")
    chans = cfg.channels()
    n = cfg.n_layers
    h = Conv4x4(chans[0], 2, True, name="conv_0")(x)
    h = nn.leaky_relu(h, cfg.leaky_slope)
    for i in range(1, n + 1):
      h = Conv4x4(chans[i], 2 if i < n else 1, False, name=f"conv_{i}")(h)
      h = BatchNorm(cfg.bn_eps, cfg.bn_momentum, name=f"norm_{i}")(h, train)
      h = nn.leaky_relu(h, cfg.leaky_slope)
    return Conv4x4(1, 1, True, name=f"conv_{n + 1}")(h)
