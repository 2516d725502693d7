"""The DiT flow-matching train step: a pure `train_step(state, batch, rng) -> (state, metrics)`.

One step on a global batch {latent [B,H,W,C], text [B,L,D], text_mask [B,L], text_len [B]}:
  1. caption dropout: each sample's caption is replaced, with probability `caption_dropout`, by the
     empty-prompt features (officially `<bos>` alone through the text encoder; docs/reference.md §1.5),
  2. t ~ logit-normal (or uniform) shifted toward noise by e^mu of the nominal resolution (docs/reference.md §4.2),
     x0 ~ N(0, I), x_t = t x1 + (1 - t) x0, target x1 - x0 (svg_jax.flow),
  3. the loss and gradients are accumulated over `micro_batches` equal slices with `lax.scan`;
     all randomness is drawn for the whole batch first, so the result does not depend on the number
     of micro-batches (up to float summation order),
  Randomness is per example: example i of the global batch draws its caption drop, t and noise
  from fold_in(rng, i), so they are functions of (seed, step, position in the global batch) only,
  whatever the batch size, the sharding or the number of processes.
  4. the global grad norm is measured before clipping, AdamW updates the params, EMA follows.
Metrics: loss (batch mean of per-sample MSE), grad_norm (pre-clip), lr (of this update),
caption_dropped (fraction of the batch whose caption was dropped).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from svg_jax import flow
from svg_jax.parallel import BATCH_AXES
from svg_jax.train import state as state_lib

def example_keys(rng, batch: int):
  """One key per example of the global batch: fold_in(rng, position)."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch, dtype=jnp.uint32))


def _per_example(rng) -> bool:
  typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
  return rng.ndim == (1 if typed else 2)


def _dropped(rng, prob: float, b: int):
  """[b] bool: one draw per key when `rng` holds a key per example, else b draws of one key."""
  if _per_example(rng):
    return jax.vmap(lambda k: jax.random.bernoulli(k, prob))(rng)
  return jax.random.bernoulli(rng, prob, (b,))


def apply_caption_dropout(rng, text, text_mask, empty_text, prob: float):
  """Replaces whole captions by the empty prompt with probability `prob` per sample.

  rng: one key, or one key per sample (`example_keys`).
  empty_text: [Le, D] features of the empty prompt; it is right-padded to the batch's L.
  Returns (text, text_mask, dropped [B] bool).
  """
  b, length, dim = text.shape
  le = empty_text.shape[0]
  if empty_text.ndim != 2 or empty_text.shape[1] != dim:
    raise ValueError(f"empty_text has shape {empty_text.shape}, the captions have dim {dim}")
  if le > length:
    raise ValueError(f"the empty prompt has {le} tokens but the caption is padded to {length}")
  empty = jnp.zeros((length, dim), text.dtype).at[:le].set(empty_text.astype(text.dtype))
  empty_mask = jnp.arange(length) < le
  dropped = _dropped(rng, prob, b)
  text = jnp.where(dropped[:, None, None], empty[None], text)
  text_mask = jnp.where(dropped[:, None], empty_mask[None], text_mask.astype(bool))
  return text, text_mask, dropped


def apply_token_dropout(rng, token_ids, text_mask, empty_ids, prob: float):
  """Token-id twin of `apply_caption_dropout`: dropped captions become the empty prompt's ids
  (`<bos>`), right-padded with the batch's padding id (position 0 of a padded row is never pad)."""
  b, length = token_ids.shape
  le = empty_ids.shape[0]
  if le > length:
    raise ValueError(f"the empty prompt has {le} tokens but the caption is padded to {length}")
  pad = jnp.zeros((length,), token_ids.dtype).at[:le].set(jnp.asarray(empty_ids, token_ids.dtype))
  empty_mask = jnp.arange(length) < le
  dropped = _dropped(rng, prob, b)
  token_ids = jnp.where(dropped[:, None], pad[None], token_ids)
  text_mask = jnp.where(dropped[:, None], empty_mask[None], text_mask.astype(bool))
  return token_ids, text_mask, dropped


def _to_micro(x, m: int):
  """[B, ...] -> [m, B/m, ...] with micro-batch k = rows k, k+m, k+2m, ...: every device keeps
  an equal share of every micro-batch, so slicing moves no data between devices."""
  b = x.shape[0]
  x = x.reshape((b // m, m) + x.shape[1:])
  x = jnp.swapaxes(x, 0, 1)
  spec = (None, BATCH_AXES) + (None,) * (x.ndim - 2)
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


def time_shift_factor(config) -> float | None:
  """The factor that shifts training times toward noise (`flow.sample_timesteps`), None when
  `flow.resolution_shift` is off: that of the nominal resolution's token count (official:
  (train_res / 16)^2), not the bucket's."""
  if not config.flow.resolution_shift:
    return None
  pixels_per_token = int(config.autoencoder.encoder.patch_size) * int(config.model.patch_size)
  return flow.shift_factor_for_seq_len((int(config.data.resolution) // pixels_per_token) ** 2)


def make_train_step(model, tx: optax.GradientTransformation, config,
                    empty_text: np.ndarray, text_model=None) -> Callable:
  """Builds the pure step for `model` (a NextDiT) with the optimizer `tx` and the config.

  empty_text: the empty prompt's features [Le, D], or with `text_model` (a frozen Gemma2Encoder,
  online mode) its token ids [Le].

  The returned function must run under `parallel.mesh_context` (its sharding constraints name the
  mesh axes); jit it with in/out shardings and `donate_argnums=0`.
  """
  tcfg, fcfg = config.train, config.flow
  micro = int(tcfg.micro_batches)
  dropout = float(tcfg.caption_dropout)
  decay = float(tcfg.ema_decay)
  schedule = state_lib.lr_schedule(tcfg)
  shift = time_shift_factor(config)
  empty_text = np.asarray(empty_text)
  if text_model is not None and (empty_text.ndim != 1
                                 or not np.issubdtype(empty_text.dtype, np.integer)):
    raise ValueError(f"online text mode needs the empty prompt's token ids [tokens], got "
                     f"{empty_text.dtype} {list(empty_text.shape)} (data.empty_text)")
  empty_text = empty_text.astype(np.int32 if text_model is not None else np.float32)

  def condition(batch, rng, text_params):
    """(text features [B, L, D] fp32, mask [B, L] bool, dropped [B]) for the batch."""
    if text_model is None:
      return apply_caption_dropout(rng, batch["text"].astype(jnp.float32), batch["text_mask"],
                                   empty_text, dropout)
    ids, mask, dropped = apply_token_dropout(rng, batch["token_ids"], batch["text_mask"],
                                             empty_text, dropout)
    feats, _ = text_model.apply({"params": text_params}, ids, mask)
    return jax.lax.stop_gradient(feats.astype(jnp.float32)), mask, dropped

  def loss_fn(params, x1, x0, t, text, text_mask):
    v = model.apply({"params": params}, flow.interpolate(x0, x1, t)[0], t, text, text_mask)
    loss, _ = flow.flow_matching_loss(v, x0, x1)
    return loss

  grad_fn = jax.value_and_grad(loss_fn)

  def train_step(state: state_lib.TrainState, batch: dict, rng: jax.Array, text_params=None):
    x1 = batch["latent"].astype(jnp.float32)
    b = x1.shape[0]
    if b % micro:
      raise ValueError(f"batch {b} is not divisible by train.micro_batches {micro}")
    keys = jax.vmap(lambda k: jax.random.split(k, 3))(example_keys(rng, b))
    k_drop, k_t, k_noise = keys[:, 0], keys[:, 1], keys[:, 2]
    text, text_mask, dropped = condition(batch, k_drop, text_params)
    t = jax.vmap(lambda k: flow.sample_timesteps(
        k, 1, fcfg.timestep_sampling, float(fcfg.logit_mean), float(fcfg.logit_std), shift)[0]
                 )(k_t)
    x0 = jax.vmap(lambda k: jax.random.normal(k, x1.shape[1:], jnp.float32))(k_noise)

    inputs = tuple(_to_micro(a, micro) for a in (x1, x0, t, text, text_mask))

    def accumulate(carry, mb):
      loss_sum, grad_sum = carry
      loss, grads = grad_fn(state.params, *mb)
      return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), inputs)
    loss = loss_sum / micro  # equal micro-batch sizes: the mean of means is the batch mean
    grads = jax.tree.map(lambda g: g / micro, grad_sum)
    grad_norm = optax.tree.norm(grads)

    new_state = state_lib.apply_gradients(state, grads, tx, decay)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
               "caption_dropped": jnp.mean(dropped.astype(jnp.float32))}
    return new_state, metrics

  return train_step
