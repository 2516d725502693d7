"""The train state (step, fp32 params, optimizer state, EMA params) and the optimizer from config.

The optimizer follows the official recipe (docs/reference.md §5): global-norm gradient clipping, then AdamW
(b1, b2, eps, weight decay from `config.train`) with a learning-rate schedule:
  constant         lr at every step (the official choice)
  warmup_constant  linear 0 -> lr over `warmup_steps`, then lr
  warmup_cosine    linear 0 -> lr over `warmup_steps`, then cosine decay to 0 at `num_steps`
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from svg_jax import parallel

LR_SCHEDULES = ("constant", "warmup_constant", "warmup_cosine")


class TrainState(flax.struct.PyTreeNode):
  """Everything a step updates. `step` counts completed optimizer updates."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any


def lr_schedule(train_cfg) -> Callable[[jax.Array], jax.Array]:
  lr, warmup = float(train_cfg.lr), int(train_cfg.warmup_steps)
  kind = train_cfg.lr_schedule
  if kind == "constant":
    return optax.constant_schedule(lr)
  if kind == "warmup_constant":
    if warmup <= 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  if kind == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, max(warmup, 0), max(int(train_cfg.num_steps), warmup + 1),
        end_value=float(train_cfg.lr_end))
  raise ValueError(f"train.lr_schedule {kind!r} is not one of {LR_SCHEDULES}")


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """Clip by global norm (<= 0 disables it), then AdamW with the schedule."""
  adamw = optax.adamw(lr_schedule(train_cfg), b1=float(train_cfg.b1), b2=float(train_cfg.b2),
                      eps=float(train_cfg.eps), weight_decay=float(train_cfg.weight_decay))
  if float(train_cfg.grad_clip) > 0:
    return optax.chain(optax.clip_by_global_norm(float(train_cfg.grad_clip)), adamw)
  return adamw


def create_state(params, tx: optax.GradientTransformation) -> TrainState:
  """A fresh state; works on logically boxed params too (then every leaf stays boxed, which is how
  the loop derives shardings for the optimizer and EMA trees from the parameter annotations)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree.map(lambda p: p, params))


def unbox(tree):
  return nn.meta.unbox(tree)


def sharded_abstract_state(boxed_state, mesh, rules):
  """(shardings, abstract state) of an eval_shape'd, logically boxed state on `mesh`: the
  optimizer moments and EMA inherit the shardings of the parameters they mirror."""
  shardings = parallel.logical_shardings(boxed_state, mesh, rules)
  return shardings, parallel.abstract_arrays(unbox(boxed_state), shardings)


def ema_update(ema, params, decay: float):
  """ema <- decay * ema + (1 - decay) * params (fp32)."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation,
                    ema_decay: float) -> TrainState:
  """One optimizer update of `state` with `grads`; the EMA then follows the new params."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       ema_params=ema_update(state.ema_params, params, ema_decay))
