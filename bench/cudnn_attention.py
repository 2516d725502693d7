"""GPU only: our cuDNN attention backend against torch's scaled_dot_product_attention (the
reference) and our XLA backend, on the 2B heads (24 query / 8 key-value heads of 96) with
right-padded keys.

  python bench/cudnn_attention.py

Prints the largest error of each backend's output and of its gradients (of sum(out^2) with
respect to q, k, v, relative to the largest reference gradient) against torch (bf16 inputs, fp32
reference), and the forward + backward time of each, side by side in one run, as ratios against
torch. JAX and torch share the GPU in this process: JAX allocates as it goes
(XLA_PYTHON_CLIENT_PREALLOCATE=false unless the environment says otherwise), instead of taking
`cli.run`'s share of the card up front.
"""
from __future__ import annotations

import os

from absl import app, flags

from svg_jax import cli
from svg_jax.input_errors import InputError

flags.DEFINE_list("tokens", ["512", "4352"], "sequence lengths (stage 1 and stage 3 of the recipe)")
flags.register_validator("tokens", lambda tokens: all(n.isdigit() and int(n) > 0 for n in tokens),
                         message="--tokens: expected positive integers, e.g. 512,4352")
flags.DEFINE_integer("batch", 4, "batch", lower_bound=1)
FLAGS = flags.FLAGS

HEADS, KV_HEADS, HEAD_DIM = 24, 8, 96
PAD_STEP = 37  # keys of padding added from one row of the batch to the next


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  shortest = PAD_STEP * (FLAGS.batch - 1) + 1  # row i of the batch holds n - PAD_STEP * i keys
  if any(int(n) < shortest for n in FLAGS.tokens):
    raise InputError(f"--tokens {','.join(FLAGS.tokens)}: each must be at least {shortest} at "
                     f"--batch {FLAGS.batch} (row i is right-padded by {PAD_STEP} x i keys)")
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before JAX's GPU client
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from harness import interleave, summarize

  from svg_jax.models import layers

  if jax.default_backend() != "gpu" or not torch.cuda.is_available():
    raise SystemExit("bench/cudnn_attention.py needs a GPU visible to both jax and torch")
  for n in map(int, FLAGS.tokens):
    b = FLAGS.batch
    rng = np.random.default_rng(n)
    q = rng.standard_normal((b, n, HEADS, HEAD_DIM)).astype(np.float32)
    k = rng.standard_normal((b, n, KV_HEADS, HEAD_DIM)).astype(np.float32)
    v = rng.standard_normal((b, n, KV_HEADS, HEAD_DIM)).astype(np.float32)
    # right padding, one full row
    lengths = np.array([n - PAD_STEP * i for i in range(b)], np.int32)
    # Reference: torch SDPA in fp32 on the bf16-rounded inputs, GQA by repeating key-value heads.
    tq, tk, tv = (torch.from_numpy(a).cuda().to(torch.bfloat16).float().transpose(1, 2)
                  for a in (q, k, v))
    rep = HEADS // KV_HEADS
    mask = (torch.arange(n, device="cuda")[None, :] < torch.from_numpy(lengths).cuda()[:, None])
    rq, rk, rv = (t.clone().requires_grad_() for t in (tq, tk, tv))
    ref = torch.nn.functional.scaled_dot_product_attention(
        rq, rk.repeat_interleave(rep, 1), rv.repeat_interleave(rep, 1),
        attn_mask=mask[:, None, None])
    (ref ** 2).sum().backward()
    ref = ref.detach().transpose(1, 2).cpu().numpy()
    ref_grads = [t.grad.transpose(1, 2).cpu().numpy() for t in (rq, rk, rv)]
    tk, tv = tk.repeat_interleave(rep, 1), tv.repeat_interleave(rep, 1)

    jq, jk, jv = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    jl = jnp.asarray(lengths)
    fns = {}
    for backend in ("cudnn", "xla"):
      def loss(q_, k_, v_, backend=backend):
        out = layers.attention(q_, k_, v_, kv_lengths=jl, backend=backend,
                               compute_dtype=jnp.bfloat16)
        return jnp.sum(out * out), out
      fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
      (_, out), grads = fwd_bwd(jq, jk, jv)
      err = float(np.max(np.abs(np.asarray(out, np.float32) - ref)))
      grad_errs = [float(np.max(np.abs(np.asarray(g, np.float32) - r)) / np.max(np.abs(r)))
                   for g, r in zip(grads, ref_grads)]
      print(f"tokens {n}: {backend:<6} max |out - torch sdpa fp32| = {err:.3g}; "
            "gradients dq dk dv: "
            + " ".join(f"{e:.3g}" for e in grad_errs) + " (max error / max |reference|)")
      fns[f"svg-jax {backend}"] = (lambda f=fwd_bwd: jax.block_until_ready(f(jq, jk, jv)))

    bq, bk, bv = (t.to(torch.bfloat16).requires_grad_() for t in (tq, tk, tv))

    def torch_fwd_bwd():
      out = torch.nn.functional.scaled_dot_product_attention(bq, bk, bv,
                                                             attn_mask=mask[:, None, None])
      (out.float() ** 2).sum().backward()
      torch.cuda.synchronize()

    fns["torch sdpa"] = torch_fwd_bwd
    times = interleave(fns, rounds=5, per_round=5)
    print(f"\n== attention forward + backward, batch {b}, {n} tokens, bf16")
    print(summarize(times, "torch sdpa", b, "seq"), flush=True)


if __name__ == "__main__":
  cli.run(main)
