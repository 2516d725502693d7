"""LPIPS (Zhang et al. 2018, VGG variant) as taming-transformers / the `lpips` package compute it.

Used by decoder training (docs/reference.md §3.3: rec = L1 + 1.0 * LPIPS on [-1, 1] images):
  x -> (x - shift) / scale           shift (-.030, -.088, -.188), scale (.458, .448, .450)
  -> VGG16 `features` (torchvision layout, 3x3 convs with padding 1, ReLU, 2x2 max-pools), tapped
     after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (64, 128, 256, 512, 512 channels)
  -> per tap: unit-normalize over channels (x / (sqrt(sum x^2) + 1e-10)), squared difference of the
     two images, a 1x1 conv to one channel without bias (`lin{k}`; its dropout is off in eval),
     mean over H and W
  -> sum over taps: one distance per image [B].

Parameters (loaded by svg_jax/convert/lpips.py from torchvision's VGG16 state dict and the lpips
package's `vgg.pth`): `vgg` {conv_{i}_kernel [3, 3, in, out], conv_{i}_bias [out]} for the 13
convs, i the torchvision `features` index, and `lin_{k}` [C_k] (the 1x1 head weights). The network
is frozen: it is applied with its params as constants and only the gradient w.r.t. the images is
used.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# torchvision vgg16().features: (index, out channels) of each conv; "M" = max-pool index.
VGG16_LAYOUT = ((0, 64), (2, 64), "M4", (5, 128), (7, 128), "M9", (10, 256), (12, 256), (14, 256),
                "M16", (17, 512), (19, 512), (21, 512), "M23", (24, 512), (26, 512), (28, 512))
TAPS = (2, 7, 14, 21, 28)  # conv indices whose ReLU output LPIPS compares (relu1_2 .. relu5_3)
TAP_CHANNELS = (64, 128, 256, 512, 512)
CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")


def _conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   preferred_element_type=jnp.float32)
  return y + bias


def _max_pool2(x: jax.Array) -> jax.Array:
  """MaxPool2d(2, 2) (floor mode: an odd last row/column is dropped, as torch)."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


class VGG16Features(nn.Module):
  """torchvision VGG16 `features[:30]` on NHWC input; returns the 5 LPIPS taps."""

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    taps = []
    h = x.astype(jnp.float32)
    for entry in VGG16_LAYOUT:
      if isinstance(entry, str):
        h = _max_pool2(h)
        continue
      idx, cout = entry
      cin = h.shape[-1]
      kernel = self.param(f"conv_{idx}_kernel", nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), CONV_AXES), (3, 3, cin, cout), jnp.float32)
      bias = self.param(f"conv_{idx}_bias", nn.with_logical_partitioning(
          nn.initializers.zeros_init(), ("conv_out",)), (cout,), jnp.float32)
      h = jax.nn.relu(_conv3x3(h, kernel, bias))
      if idx in TAPS:
        taps.append(h)
    return taps


def normalize_channels(x: jax.Array, eps: float = 1e-10) -> jax.Array:
  return x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
  """Distance between image batches a, b [B, H, W, 3] in [-1, 1] -> [B] (fp32)."""

  @nn.compact
  def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
    shift = np.asarray(SHIFT, np.float32)
    scale = np.asarray(SCALE, np.float32)
    vgg = VGG16Features(name="vgg")
    fa = vgg((a.astype(jnp.float32) - shift) / scale)
    fb = vgg((b.astype(jnp.float32) - shift) / scale)
    total = jnp.zeros((a.shape[0],), jnp.float32)
    for k, (x, y) in enumerate(zip(fa, fb)):
      diff = jnp.square(normalize_channels(x) - normalize_channels(y))
      w = self.param(f"lin_{k}", nn.with_logical_partitioning(
          nn.initializers.uniform(0.1), ("conv_in",)), (x.shape[-1],), jnp.float32)
      total = total + jnp.mean(jnp.einsum("bhwc,c->bhw", diff, w), axis=(1, 2))
    return total
