"""Unified Next-DiT (Lumina-Image-2.0 single-stream transformer) as used by SVG-T2I.

Computes exactly what the official `model_dino.NextDiT` computes on valid tokens (docs/reference.md §1.3-1.4),
with a static layout that jit likes:
  * context refiner over the right-padded caption [B, Lc] (key mask = caption mask),
  * noise refiner over the image tokens [B, N] (one latent size per batch, so no padding),
  * joint layers over [image tokens | caption padded to Lc]: valid keys are a prefix of length N + cap_len,
    so a key-padding length (not a mask in the middle) describes it and cuDNN / splash can take it.
Attention is permutation-equivariant given (RoPE ids, key mask), so the official per-sample layout
[caption valid | image | pad] and this one give the same outputs on valid tokens, provided image tokens use
axis-0 position id = the effective caption length (not Lc) and padded caption keys are masked.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from svg_jax.input_errors import InputError
from svg_jax.models import config_dict, kernel_residuals, layers, splash_attention

# What each block keeps for its backward, least recomputation first (the order in which the
# trainer's "auto" tries them, svg_jax/train/remat.py):
#   none              everything (no remat)
#   dots              every matmul output (XLA attention: its scores too); elementwise work redone
#   dots_no_batch     the Linear layers' outputs (2-D dots); (XLA attention) its products are redone
#   save_qkv_attn     q, k, v and the attention output (`QKV_ATTN_NAMES`); the FFN, the out
#                     projection, norms and (XLA attention) the scores are redone
#   offload_qkv_attn  the same in pinned host memory instead of device memory (GPU, TPU)
#   full              the block's input only; its whole forward is redone
# Every policy but full also keeps what a fused attention kernel's forward computed (cuDNN, splash:
# its output and softmax statistics, `kernel_residuals.NAME`), so its backward does not run that
# forward again.
REMAT_POLICIES = ("none", "dots", "dots_no_batch", "save_qkv_attn", "offload_qkv_attn", "full")
# "auto": the trainer picks one of REMAT_POLICIES from the device memory before it builds its
# step. A model built with "auto" unresolved (sampling, launch/aot_compile.py) remats fully: the
# policy that needs the least memory.
AUTO = "auto"
ACTIVATION_DTYPES = ("float32", "compute")
COMPUTE_DTYPES = ("float32", "bfloat16")  # the tested ones
LAYER_LOOPS = ("scan", "unrolled", AUTO)
# checkpoint_name tags in the attention: its inputs after RoPE and its output before `out`.
QKV_ATTN_NAMES = ("attn_q", "attn_k", "attn_v", "attn_out")


@dataclasses.dataclass(frozen=True)
class NextDiTConfig:
  """Model hyperparameters; defaults are the official 2B model (docs/reference.md §1.2)."""
  patch_size: int = 1
  in_channels: int = 384
  dim: int = 2304
  n_layers: int = 26
  n_refiner_layers: int = 2
  n_heads: int = 24
  n_kv_heads: int = 8
  multiple_of: int = 256
  ffn_dim_multiplier: float | None = None
  norm_eps: float = 1e-5
  # Official q/k RMSNorm eps: 1e-6 with the plain fallback (requirements.txt), 1e-5 with apex. The
  # released checkpoint's value is unverified (docs/equivalence/nextdit.md §4.1).
  qk_norm_eps: float = 1e-6
  cap_feat_dim: int = 2304
  axes_dims: tuple[int, ...] = (32, 32, 32)
  axes_lens: tuple[int, ...] = (600, 512, 512)
  rope_theta: float = 10000.0
  t_freq_dim: int = 256
  # Implementation choices (no effect on the function computed beyond rounding).
  compute_dtype: str = "float32"
  # The activations between ops: "float32", or "compute": in the compute dtype (bf16), as the
  # official trainer's autocast hands them on (half the memory of saved activations and of
  # elementwise traffic). Norms, RoPE, softmax and the matmuls' accumulation stay fp32 either way,
  # and the model's output is fp32.
  activation_dtype: str = "float32"
  attention_backend: str = "xla"
  scan_layers: bool = True
  # How the stacked layers run: "scan" (a loop: XLA compiles one layer), "unrolled" (each layer
  # its own code over its slice of the stack: no stacks of saved activations, a longer compile)
  # or "auto" (unrolled when the trace compiles for a GPU, where it measured faster, else scan).
  layer_loop: str = "scan"
  # Layers per iteration of the scan's loop (XLA unrolls that many): fewer loop boundaries for
  # the scheduler to work across, at a longer compile. Below n_layers: a loop of one iteration
  # would let XLA merge the remat's recomputation into the forward (layer_loop="unrolled").
  scan_unroll: int = 1
  remat_policy: str = "none"

  @property
  def activations(self):
    """The dtype of the activations between ops."""
    return jnp.dtype(self.compute_dtype if self.activation_dtype == "compute" else "float32")

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  @property
  def adaln_dim(self) -> int:
    return min(self.dim, 1024)

  @property
  def ffn_dim(self) -> int:
    hidden = 4 * self.dim
    if self.ffn_dim_multiplier is not None:
      hidden = int(self.ffn_dim_multiplier * hidden)
    return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

  def validate(self) -> None:
    problems = self._size_problems()
    if problems:  # the checks below divide by these sizes
      raise InputError("invalid NextDiT config: " + "; ".join(problems))
    if self.compute_dtype not in COMPUTE_DTYPES:
      problems.append(f"compute_dtype {self.compute_dtype!r} not in {COMPUTE_DTYPES}")
    if self.dim % self.n_heads:
      problems.append(f"dim {self.dim} not divisible by n_heads {self.n_heads}")
    elif sum(self.axes_dims) != self.head_dim:
      problems.append(f"sum(axes_dims)={sum(self.axes_dims)} != head_dim {self.head_dim}")
    if self.n_heads % self.n_kv_heads:
      problems.append(f"n_heads {self.n_heads} not a multiple of n_kv_heads {self.n_kv_heads}")
    if any(d % 2 for d in self.axes_dims):
      problems.append(f"axes_dims {self.axes_dims} must be even")
    if len(self.axes_dims) != 3 or len(self.axes_lens) != 3:
      problems.append("axes_dims and axes_lens need 3 entries (caption, row, column)")
    if not 1 <= self.scan_unroll <= max(self.n_layers - 1, 1):
      problems.append(f"scan_unroll {self.scan_unroll} not in [1, {max(self.n_layers - 1, 1)}] "
                      "(all layers unrolled: layer_loop='unrolled')")
    if self.layer_loop not in LAYER_LOOPS:
      problems.append(f"layer_loop {self.layer_loop!r} not in {LAYER_LOOPS}")
    if self.remat_policy not in REMAT_POLICIES + (AUTO,):
      problems.append(f"remat_policy {self.remat_policy!r} not in {REMAT_POLICIES + (AUTO,)}")
    if self.activation_dtype not in ACTIVATION_DTYPES:
      problems.append(f"activation_dtype {self.activation_dtype!r} not in {ACTIVATION_DTYPES}")
    if self.attention_backend not in layers.ATTENTION_BACKENDS:
      problems.append(f"attention_backend {self.attention_backend!r} not in "
                      f"{layers.ATTENTION_BACKENDS}")
    if problems:
      raise InputError("invalid NextDiT config: " + "; ".join(problems))

  def _size_problems(self) -> list[str]:
    problems = config_dict.whole_number_problems(self, dict(
        patch_size=1, in_channels=1, dim=1, n_layers=1, n_refiner_layers=0, n_heads=1,
        n_kv_heads=1, multiple_of=1, cap_feat_dim=1, t_freq_dim=2, scan_unroll=1))
    for name in ("axes_dims", "axes_lens"):
      if not all(config_dict.is_whole_number(v, 1) for v in getattr(self, name)):
        problems.append(f"{name} must be integers >= 1, got {getattr(self, name)!r}")
    return problems

  @classmethod
  def from_dict(cls, d: Any) -> "NextDiTConfig":
    return config_dict.from_dict(cls, d, "NextDiT", ("axes_dims", "axes_lens"))


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoid of raw flow time t in [0, 1] (no x1000), layout [cos, sin], fp32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def position_ids(cap_lens: jax.Array, cap_pad_len: int, grid_h: int, grid_w: int
                 ) -> tuple[jax.Array, jax.Array]:
  """Official RoPE ids (docs/reference.md §1.4): caption j -> (j, 0, 0), padding -> (0, 0, 0),
  image (r, c) -> (effective caption length, r, c). Returns (caption ids [B, Lc, 3], image ids [B, N, 3]).
  """
  b = cap_lens.shape[0]
  j = jnp.arange(cap_pad_len)
  cap_axis0 = jnp.where(j[None, :] < cap_lens[:, None], j[None, :], 0)
  cap_ids = jnp.stack([cap_axis0, jnp.zeros_like(cap_axis0), jnp.zeros_like(cap_axis0)], -1)
  rows, cols = jnp.meshgrid(jnp.arange(grid_h), jnp.arange(grid_w), indexing="ij")
  img_rc = jnp.stack([rows.reshape(-1), cols.reshape(-1)], -1)
  img_ids = jnp.concatenate([
      jnp.broadcast_to(cap_lens[:, None, None], (b, grid_h * grid_w, 1)),
      jnp.broadcast_to(img_rc[None], (b, grid_h * grid_w, 2))], -1)
  return cap_ids.astype(jnp.int32), img_ids.astype(jnp.int32)


def patchify(x: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C], tokens row-major, token vector ordered (ph, pw, C)."""
  b, h, w, c = x.shape
  if h % p or w % p:
    raise ValueError(f"latent size {h}x{w} not divisible by patch size {p}")
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: jax.Array, p: int, h: int, w: int) -> jax.Array:
  """Inverse of `patchify`."""
  b, _, d = tokens.shape
  c = d // (p * p)
  x = tokens.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def fused_xavier_uniform(fan_in: int, fused_fan_out: int):
  """Xavier-uniform with the fans of the official fused qkv Linear, for one of its row blocks."""
  bound = math.sqrt(6.0 / (fan_in + fused_fan_out))
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _dtype(name: str):
  return jnp.dtype(name)


def _linear(cfg: NextDiTConfig, features: int, axes, use_bias: bool, **kwargs) -> layers.Linear:
  """A Linear with the config's compute and activation dtypes."""
  return layers.Linear(features, axes, use_bias, _dtype(cfg.compute_dtype),
                       out_dtype=cfg.activations, **kwargs)


class Attention(nn.Module):
  """GQA attention with per-head q/k RMSNorm before interleaved RoPE; no biases."""
  cfg: NextDiTConfig

  @nn.compact
  def __call__(self, x, cos, sin, kv_lengths):
    cfg = self.cfg
    b, t, _ = x.shape
    hd, dt = cfg.head_dim, _dtype(cfg.compute_dtype)
    # Separate q/k/v kernels (tensor-parallel friendly); initialized like the official fused qkv.
    init = fused_xavier_uniform(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * hd)
    q = _linear(cfg, cfg.n_heads * hd, ("embed", "heads"), False, kernel_init=init, name="to_q")(x)
    k = _linear(cfg, cfg.n_kv_heads * hd, ("embed", "kv_heads"), False, kernel_init=init,
                name="to_k")(x)
    v = _linear(cfg, cfg.n_kv_heads * hd, ("embed", "kv_heads"), False, kernel_init=init,
                name="to_v")(x)
    q = q.reshape(b, t, cfg.n_heads, hd)
    k = k.reshape(b, t, cfg.n_kv_heads, hd)
    v = v.reshape(b, t, cfg.n_kv_heads, hd)
    q = layers.RMSNorm(cfg.qk_norm_eps, "head_dim", name="q_norm")(q)
    k = layers.RMSNorm(cfg.qk_norm_eps, "head_dim", name="k_norm")(k)
    q = checkpoint_name(layers.apply_interleaved_rope(q, cos, sin), "attn_q")
    k = checkpoint_name(layers.apply_interleaved_rope(k, cos, sin), "attn_k")
    v = checkpoint_name(v, "attn_v")
    out = layers.attention(q, k, v, kv_lengths=kv_lengths, backend=cfg.attention_backend,
                           compute_dtype=dt)
    out = out.reshape(b, t, cfg.n_heads * hd).astype(cfg.activations)
    out = checkpoint_name(out, "attn_out")
    return _linear(cfg, cfg.dim, ("heads", "embed"), False, name="out")(out)


class FeedForward(nn.Module):
  """SwiGLU: w2(silu(w1 x) * w3 x); Lumina naming (w1 gate, w3 up, w2 down)."""
  cfg: NextDiTConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    gate = _linear(cfg, cfg.ffn_dim, ("embed", "mlp"), False, name="w1")(x)
    up = _linear(cfg, cfg.ffn_dim, ("embed", "mlp"), False, name="w3")(x)
    return _linear(cfg, cfg.dim, ("mlp", "embed"), False, name="w2")(layers.swiglu(gate, up))


class JointBlock(nn.Module):
  """Sandwich-norm transformer block; with `modulated`, scale-only adaLN and tanh-gated residuals."""
  cfg: NextDiTConfig
  modulated: bool = True

  @nn.compact
  def __call__(self, x, c, cos, sin, kv_lengths):
    cfg = self.cfg
    eps = cfg.norm_eps
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    attn = Attention(cfg, name="attention")
    ffn = FeedForward(cfg, name="feed_forward")
    norm = lambda name: layers.RMSNorm(eps, "norm", name=name)  # noqa: E731
    if self.modulated:
      mod = _linear(cfg, 4 * cfg.dim, ("adaln", "adaln_out"), True,
                    kernel_init=nn.initializers.zeros_init(), name="adaLN_modulation")(nn.silu(c))
      scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(mod[:, None, :], 4, axis=-1)
      h = attn(norm("attention_norm1")(x, 1 + scale_msa), cos, sin, kv_lengths)
      x = x + norm("attention_norm2")(h, jnp.tanh(gate_msa))
      h = ffn(norm("ffn_norm1")(x, 1 + scale_mlp))
      x = x + norm("ffn_norm2")(h, jnp.tanh(gate_mlp))
    else:
      x = x + norm("attention_norm2")(attn(norm("attention_norm1")(x), cos, sin, kv_lengths))
      x = x + norm("ffn_norm2")(ffn(norm("ffn_norm1")(x)))
    return x


class _ScanBlock(nn.Module):
  """JointBlock in the (carry, broadcast...) -> (carry, None) form `nn.scan` wants."""
  cfg: NextDiTConfig

  @nn.compact
  def __call__(self, x, c, cos, sin, kv_lengths):
    return JointBlock(self.cfg, True, name="block")(x, c, cos, sin, kv_lengths), None


def remat_policy_fn(policy: str):
  """The `jax.checkpoint` policy of a REMAT_POLICIES name (None: save nothing, i.e. full)."""
  cp = jax.checkpoint_policies
  names = [*QKV_ATTN_NAMES, kernel_residuals.NAME]
  kernel = cp.save_only_these_names(kernel_residuals.NAME)
  return {
      "full": None,
      AUTO: None,
      "dots": cp.save_from_both_policies(cp.checkpoint_dots, kernel),
      "dots_no_batch": cp.save_from_both_policies(cp.checkpoint_dots_with_no_batch_dims, kernel),
      "save_qkv_attn": cp.save_only_these_names(*names),
      "offload_qkv_attn": cp.save_and_offload_only_these_names(
          names_which_can_be_saved=[], names_which_can_be_offloaded=names,
          offload_src="device", offload_dst="pinned_host"),
  }[policy]


def _remat(module_cls, policy: str, scanned: bool):
  if policy == "none":
    return module_cls
  # Inside nn.scan the loop keeps XLA from merging the recomputation back into the forward;
  # unrolled blocks need JAX's barrier for that (without it XLA:CPU's peak rose toward none's).
  return nn.remat(module_cls, policy=remat_policy_fn(policy), prevent_cse=not scanned)


def resolved_layer_loop(cfg: NextDiTConfig) -> str:
  """How the main layers run in the trace at hand: "scan" or "unrolled" (unscanned layers are
  unrolled; "auto" resolved for the platform the trace compiles for)."""
  if not cfg.scan_layers:
    return "unrolled"
  if cfg.layer_loop == AUTO:
    return "unrolled" if splash_attention.compile_platform() in layers.GPU_PLATFORMS else "scan"
  return cfg.layer_loop


def _unrolled_stack(cfg: NextDiTConfig, stacked, seq, c, cos, sin, kv_lengths):
  """The stacked layers as straight-line code, each a remat'd block on its slice of the stacked
  params: no stacks of saved activations to zero, fill and slice, and no stacked gradients
  written layer by layer, as a loop needs (docs/performance.md, "One layer's code or 26")."""
  block = JointBlock(cfg, True, parent=None)
  ones = [1] * cfg.n_layers
  stacked = nn.meta.unbox(stacked)

  def layer(stacked, i, *args):
    # Sliced inside the remat: a slice made outside would be one of its inputs, which the
    # backward keeps (26 layers' fp32 weights: +8 GiB at stage 1 on a GPU). lax.split's
    # transpose concatenates, so the layers' gradients make one stack, not n padded ones.
    params = jax.tree.map(lambda a: jax.lax.split(a, ones, axis=0)[i][0], stacked)
    return block.apply({"params": params}, *args)

  if cfg.remat_policy != "none":
    # With no loop between the forward and the backward, only JAX's barrier keeps XLA from
    # merging the recomputation back into the forward.
    layer = jax.checkpoint(layer, policy=remat_policy_fn(cfg.remat_policy), prevent_cse=True,
                           static_argnums=(1,))
  for i in range(cfg.n_layers):
    seq = layer(stacked, i, seq, c, cos, sin, kv_lengths)
  return seq


class NextDiT(nn.Module):
  """The SVG-T2I DiT. Inputs are channel-last latents; output is the predicted velocity.

  Args (call):
    x: [B, H, W, C] latents (one size per batch).
    t: [B] flow time in [0, 1] (0 noise, 1 data).
    cap_feats: [B, Lc, cap_feat_dim] text features, right-padded.
    cap_mask: [B, Lc] bool/int, 1 = valid, right-padded (at least one valid token per sample).
  Returns [B, H, W, C] velocity.
  """
  cfg: NextDiTConfig

  @nn.compact
  def __call__(self, x, t, cap_feats, cap_mask):
    cfg = self.cfg
    p = cfg.patch_size
    b, h, w, _ = x.shape
    gh, gw = h // p, w // p
    n_img = gh * gw
    lc = cap_feats.shape[1]
    cap_lens = jnp.sum(cap_mask.astype(jnp.int32), axis=1)

    # Conditioning: timestep MLP (256 -> adaln -> adaln), caption RMSNorm + Linear.
    temb = timestep_embedding(t, cfg.t_freq_dim)
    c = _linear(cfg, cfg.adaln_dim, ("freq", "adaln"), True,
                kernel_init=nn.initializers.normal(0.02), name="t_embedder_0")(temb)
    c = _linear(cfg, cfg.adaln_dim, ("adaln_in", "adaln"), True,
                kernel_init=nn.initializers.normal(0.02), name="t_embedder_2")(nn.silu(c))
    cap = layers.RMSNorm(cfg.norm_eps, "cap_features", name="cap_embedder_norm")(
        cap_feats.astype(jnp.float32))
    cap = _linear(cfg, cfg.dim, ("cap_features", "embed"), True,
                  kernel_init=nn.initializers.truncated_normal(0.02),
                  name="cap_embedder_linear")(cap)

    tables = layers.lumina_rope_tables(cfg.axes_dims, cfg.axes_lens, cfg.rope_theta)
    cap_ids, img_ids = position_ids(cap_lens, lc, gh, gw)
    cap_cos, cap_sin = layers.gather_rope(tables, cap_ids)
    img_cos, img_sin = layers.gather_rope(tables, img_ids)

    for i in range(cfg.n_refiner_layers):
      cap = JointBlock(cfg, False, name=f"context_refiner_{i}")(cap, None, cap_cos, cap_sin, cap_lens)

    img = _linear(cfg, cfg.dim, ("patch", "embed"), True, name="x_embedder")(
        patchify(x.astype(jnp.float32), p))
    for i in range(cfg.n_refiner_layers):
      img = JointBlock(cfg, True, name=f"noise_refiner_{i}")(img, c, img_cos, img_sin, None)

    # Joint sequence [image | caption padded]: valid keys are the first n_img + cap_len positions.
    seq = jnp.concatenate([img, cap], axis=1)
    cos = jnp.concatenate([img_cos, cap_cos], axis=1)
    sin = jnp.concatenate([img_sin, cap_sin], axis=1)
    kv_lengths = n_img + cap_lens
    if cfg.scan_layers and resolved_layer_loop(cfg) == "unrolled" and not self.is_initializing():
      seq = _unrolled_stack(cfg, self.variables["params"]["layers"]["block"],
                            seq, c, cos, sin, kv_lengths)
    elif cfg.scan_layers:
      stack = nn.scan(_remat(_ScanBlock, cfg.remat_policy, scanned=True),
                      variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                      length=cfg.n_layers, unroll=cfg.scan_unroll,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      seq, _ = stack(cfg, name="layers")(seq, c, cos, sin, kv_lengths)
    else:
      block_cls = _remat(JointBlock, cfg.remat_policy, scanned=False)
      for i in range(cfg.n_layers):
        seq = block_cls(cfg, True, name=f"layers_{i}")(seq, c, cos, sin, kv_lengths)

    # Unused by the official forward, but part of its state dict: kept so conversion is lossless.
    self.param("norm_final", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
               (cfg.dim,), jnp.float32)

    out = seq[:, :n_img]
    scale = _linear(cfg, cfg.dim, ("adaln", "embed"), True,
                    kernel_init=nn.initializers.zeros_init(), name="final_adaLN")(nn.silu(c))
    # LayerNorm in fp32, as autocast runs it.
    out = layers.layer_norm(out.astype(jnp.float32), 1e-6) * (1 + scale[:, None, :])
    out = _linear(cfg, p * p * cfg.in_channels, ("embed", "patch"), True,
                  kernel_init=nn.initializers.zeros_init(), name="final_linear")(out)
    return unpatchify(out.astype(jnp.float32), p, h, w)


def count_params(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def abstract_params(cfg: NextDiTConfig, latent_hw: Sequence[int] = (4, 4), cap_len: int = 8):
  """Parameter shapes via jax.eval_shape: nothing is allocated (works for the 2.6B config)."""
  model = NextDiT(cfg)
  h, w = latent_hw
  x = jax.ShapeDtypeStruct((1, h * cfg.patch_size, w * cfg.patch_size, cfg.in_channels), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  cap = jax.ShapeDtypeStruct((1, cap_len, cfg.cap_feat_dim), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, cap_len), jnp.bool_)
  init = lambda *args: model.init(jax.random.PRNGKey(0), *args)["params"]  # noqa: E731
  return jax.eval_shape(init, x, t, cap, mask)
