"""The benchmarks' JAX DiT train step: forward, mean-square loss against a target, backward, and an
optax update, as one function to jit. Kept apart from any torch code, so a benchmark process that
must not load torch (bench/malloc_settings.py) can build it too."""
from __future__ import annotations


def mse_step(model, tx):
  """(params, opt_state, x, t, cap, mask, target) -> (params, opt_state, loss), not yet jitted."""
  import jax
  import jax.numpy as jnp
  import optax

  def step(params, opt_state, x, t, cap, mask, target):
    def loss_fn(p):
      return jnp.mean(jnp.square(model.apply({"params": p}, x, t, cap, mask) - target))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step
