"""Fused attention kernels (cuDNN, splash) with the residuals their forward computes named for remat.

A fused attention kernel is a custom_vjp whose forward keeps its output and the softmax statistics
for the backward. Under `jax.checkpoint` those are outputs of a custom call (cuDNN) or a Pallas
kernel (splash) that no standard policy saves, so the backward ran the kernel's forward a second
time, under every policy but none. `with_named_residuals` tags exactly those residuals with
`NAME` (not the kernel's inputs q, k, v, which it also keeps: saving them is the policy's choice
through its own names), so a policy that lists `NAME` keeps them and the forward runs once.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

NAME = "attn_kernel"


def _precision(precision: str | None):
  return contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)


def with_named_residuals(fn: Callable, n_rest: int, precision: str | None = None) -> Callable:
  """fn(q, k, v, *rest) with its forward residuals named `NAME`.

  rest: `n_rest` inputs without gradient (lengths or None, segment ids, the kernel as a pytree).
  Arrays fn uses must come in as arguments, not through its closure: a custom_vjp that closes over
  the current trace's arrays leaks them under remat. With `precision`, the forward and backward
  are both traced at that matmul precision (a context manager around the call alone would miss
  the backward, which is traced when the caller differentiates)."""

  @jax.custom_vjp
  def run(q, k, v, *rest):
    with _precision(precision):
      return fn(q, k, v, *rest)

  def run_fwd(q, k, v, *rest):
    with _precision(precision):
      out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, *rest), q, k, v)
    leaves, tree = jax.tree.flatten(vjp)  # jax.vjp's function is a pytree of the kernel's residuals
    # The output is returned named too: the caller's own backward (the out projection's weight
    # gradient) reads it, and an unnamed copy would have it recomputed by the kernel's forward.
    named_out = checkpoint_name(out, NAME)
    inputs = jax.tree.leaves((q, k, v, rest))
    for i, leaf in enumerate(leaves):
      if leaf is out:
        leaves[i] = named_out
      elif not any(leaf is x for x in inputs) and jnp.issubdtype(leaf.dtype, jnp.floating):
        leaves[i] = checkpoint_name(leaf, NAME)
    return named_out, jax.tree.unflatten(tree, leaves)

  def run_bwd(vjp, g):
    with _precision(precision):
      return (*vjp(g),) + (None,) * n_rest

  run.defvjp(run_fwd, run_bwd)
  return run
