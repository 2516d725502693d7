"""Analytic FLOPs of one NextDiT train step (model FLOPs: activation recomputation is not counted),
the numerator of MFU, and of the frozen text encoder's forward.

With a batch of B samples, N image tokens (H*W / p^2), caption padded to Lc, S = N + Lc, and per
transformer block the matmul parameter count per token
    P_blk = d*(h*hd) + 2*d*(kv*hd) + (h*hd)*d + 3*d*F        (q, k, v, out, SwiGLU w1/w3/w2)
the forward pass costs
    F_fwd = 2*B*[ Lc*(Dc*d + R*P_blk) + N*(p^2*C*d + R*P_blk + d*p^2*C) + S*n_layers*P_blk
                 + (R + n_layers)*4*d*A + per-sample time/final adaLN terms ]
          + 4*B*h*hd*[ R*Lc^2 + R*N^2 + n_layers*S^2 ]       (QK^T and AV of every attention)
(Dc caption feature dim, R refiner layers, A = adaLN dim, F = SwiGLU width), and a train step is
3 * F_fwd (forward + backward twice the forward): the familiar 6 * params * tokens plus attention.
Attention is counted over the padded length (it is what the kernels compute).
"""


def _gqa_swiglu_block_params(dim: int, heads: int, kv_heads: int, head_dim: int, ffn: int) -> int:
  """Matmul weights of a GQA attention + gated-FFN block (q, k, v, o and three FFN matrices)."""
  attn = dim * heads * head_dim + 2 * dim * kv_heads * head_dim + heads * head_dim * dim
  return attn + 3 * dim * ffn


def block_matmul_params(cfg) -> int:
  """Matmul weights applied to every token of one transformer block (see the module docstring)."""
  return _gqa_swiglu_block_params(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim)


def dit_train_flops(cfg, batch: int, latent_hw: tuple[int, int], cap_len: int) -> float:
  """FLOPs of one train step (forward + backward) of the NextDiT `cfg` on one batch."""
  p = cfg.patch_size
  n = (latent_hw[0] // p) * (latent_hw[1] // p)
  lc, s = cap_len, n + cap_len
  d, a, r, layers = cfg.dim, cfg.adaln_dim, cfg.n_refiner_layers, cfg.n_layers
  pb = block_matmul_params(cfg)
  patch_dim = p * p * cfg.in_channels
  per_token = (lc * (cfg.cap_feat_dim * d + r * pb)
               + n * (patch_dim * d + r * pb + d * patch_dim)
               + s * layers * pb)
  # Per sample: timestep MLP, adaLN of modulated blocks (4d each) and of the final layer (d).
  per_sample = cfg.t_freq_dim * a + a * a + (r + layers) * a * 4 * d + a * d
  attention = 4 * cfg.n_heads * cfg.head_dim * (r * lc * lc + r * n * n + layers * s * s)
  forward = batch * (2 * (per_token + per_sample) + attention)
  return 3.0 * forward


def gemma2_forward_flops(cfg, batch: int, tokens: int) -> float:
  """FLOPs of the frozen text encoder's forward (online text mode) up to the hidden state the DiT
  reads (`cfg.hidden_layer` of transformers' `hidden_states`); Gemma2Config `cfg`."""
  per_token = _gqa_swiglu_block_params(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                                       cfg.head_dim, cfg.intermediate_size)
  # Scores and weighted sum, unmasked as XLA computes them.
  attention = 4 * cfg.num_heads * cfg.head_dim * tokens * tokens
  return float(batch * cfg.layers_needed * (2 * tokens * per_token + attention))


