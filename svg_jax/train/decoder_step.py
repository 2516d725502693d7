"""The decoder-training step of SVG-T2I (docs/reference.md §3.3): pure `train_step(state, batch, rng,
frozen) -> (state, metrics)` over images, with a frozen DINOv3 encoder inside the step.

One step on a global batch {image: uint8 [B, H, W, 3]}:
  1. x = image in [-1, 1]; z = stats-normalized DINOv3 features of the image (frozen, no gradient);
     x_hat = Decoder(z * std + mean) (the decoder sees exactly what sampling gives it).
  2. Reconstruction (official `LPIPSWithDiscriminatorDecoder`, logvar fixed at 0):
       nll = sum over pixels and channels of (|x - x_hat| + lpips_weight * LPIPS(x, x_hat)) / B
     i.e. LPIPS (one value per image) is weighted by 3 H W, as the official broadcast-and-sum does.
     Without LPIPS weights the LPIPS term is absent (the caller says so once).
  3. GAN (hinge PatchGAN): g = -mean(D(x_hat)); the VQGAN adaptive weight
       d_weight = clip(||d nll / dW|| / (||d g / dW|| + 1e-4), 0, 1e4) * disc_weight,
     W = the decoder's last conv kernel (`conv_out`), and loss = nll + d_weight * factor * g with
     factor = disc_factor once step >= disc_start (else 0). `disc_start` counts real iterations:
     the official 5000 is Lightning's global_step, which advances twice per iteration (one step per
     optimizer), i.e. 2500 iterations.
  4. Discriminator: d_loss = factor * 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))), on
     this step's reconstructions (before the decoder update), BatchNorm in train mode.
  5. Adam (config: lr 1e-4, b1 0.5, b2 0.9) updates the decoder and, every step (with zero
     gradients before disc_start, as the official optimizer steps on a zero loss), the
     discriminator.

Gradients: the decoder is differentiated once. The cotangents of nll and g w.r.t. x_hat are formed
first (through LPIPS and D), the adaptive weight needs only their pull-back through the last conv
(linear in W, with the captured input of `conv_out`), and the decoder's VJP is applied to
d nll/dx_hat + d_weight * factor * d g/dx_hat. Before disc_start the D forward/backward is skipped
(`lax.cond`); D's running BatchNorm averages (unused in training) then stay unchanged, while the
official code updates them from the first step.

Metrics: loss (nll + weighted g), nll, l1 (mean |x - x_hat|), lpips (batch mean; absent without
LPIPS weights), g_loss, d_weight, disc_factor, d_loss, logits_real, logits_fake, grad_norm
(decoder), disc_grad_norm, lr.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from svg_jax import latent_stats
from svg_jax.autoencoder import encode_images
from svg_jax.data.images import to_minus_one_one
from svg_jax.models.decoder import Decoder, DecoderConfig
from svg_jax.models.dinov3 import DINOv3Config
from svg_jax.models.discriminator import DiscriminatorConfig, NLayerDiscriminator
from svg_jax.models.lpips import LPIPS
from svg_jax.train import state as state_lib

ADAPTIVE_EPS = 1e-4
ADAPTIVE_MAX = 1e4


class DecoderTrainState(flax.struct.PyTreeNode):
  """`step` counts completed iterations; `params` are the decoder's (the trained model)."""
  step: jax.Array
  params: Any
  opt_state: Any
  disc_params: Any
  disc_stats: Any
  disc_opt_state: Any


def create_state(params, disc_variables, tx, disc_tx) -> DecoderTrainState:
  """A fresh state from decoder params and discriminator variables {params, batch_stats}."""
  return DecoderTrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      disc_params=disc_variables["params"], disc_stats=disc_variables["batch_stats"],
      disc_opt_state=disc_tx.init(disc_variables["params"]))


def hinge_d_loss(logits_real, logits_fake):
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def adaptive_weight(nll_grad, g_grad, disc_weight: float):
  """VQGAN's balance of the GAN term against the reconstruction, at the last layer."""
  w = jnp.linalg.norm(nll_grad.reshape(-1)) / (jnp.linalg.norm(g_grad.reshape(-1)) + ADAPTIVE_EPS)
  return jnp.clip(w, 0.0, ADAPTIVE_MAX) * disc_weight


def reconstruction_nll(x, x_hat, lpips_params, lpips_weight: float):
  """(nll = official sum / B, mean L1, mean LPIPS); LPIPS is skipped when lpips_params is None."""
  b = x.shape[0]
  abs_err = jnp.abs(x - x_hat)
  nll = jnp.sum(abs_err)
  per_image = jnp.zeros((b,), jnp.float32)
  if lpips_params is not None:
    per_image = LPIPS().apply({"params": lpips_params}, x, x_hat)
    pixels = x.shape[1] * x.shape[2] * x.shape[3]
    nll = nll + lpips_weight * pixels * jnp.sum(per_image)
  return nll / b, jnp.mean(abs_err), jnp.mean(per_image)


def _conv_out(h, kernel):
  """The decoder's last conv (3x3, padding 1) without bias: linear in `kernel`."""
  return jax.lax.conv_general_dilated(h, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      preferred_element_type=jnp.float32)


def make_reconstruct(encoder_cfg: DINOv3Config, decoder_cfg: DecoderConfig,
                     bf16_stats: bool = False) -> Callable:
  """(decoder params, frozen, uint8 images) -> reconstructions in about [-1, 1]."""
  decoder = Decoder(decoder_cfg)

  def reconstruct(params, frozen, images):
    z = encode_images(frozen["encoder"], frozen["mean"], frozen["std"], images, encoder_cfg,
                      bf16_stats)
    feats = latent_stats.denormalize_arrays(z, frozen["mean"], frozen["std"])
    return decoder.apply({"params": params}, feats)

  return reconstruct


def make_train_step(encoder_cfg: DINOv3Config, decoder_cfg: DecoderConfig,
                    disc_cfg: DiscriminatorConfig, tx: optax.GradientTransformation,
                    disc_tx: optax.GradientTransformation, loss_cfg, train_cfg,
                    bf16_stats: bool = False) -> Callable:
  """The pure step. `frozen` = {"encoder", "mean", "std", "lpips" (params or None)}.

  loss_cfg: lpips_weight, disc_weight, disc_factor, disc_start (iterations).
  """
  decoder = Decoder(decoder_cfg)
  disc = NLayerDiscriminator(disc_cfg)
  lpips_weight = float(loss_cfg.lpips_weight)
  disc_weight = float(loss_cfg.disc_weight)
  disc_factor = float(loss_cfg.disc_factor)
  disc_start = int(loss_cfg.disc_start)
  schedule = state_lib.lr_schedule(train_cfg)

  def run_disc(dparams, stats, images):
    logits, new = disc.apply({"params": dparams, "batch_stats": stats}, images, True,
                             mutable=["batch_stats"])
    return logits, new["batch_stats"]

  def train_step(state: DecoderTrainState, batch: dict, rng: jax.Array, frozen: dict):
    del rng  # deterministic: no dropout, no sampling
    images = batch["image"]
    x = to_minus_one_one(images)
    z = encode_images(frozen["encoder"], frozen["mean"], frozen["std"], images, encoder_cfg,
                      bf16_stats)
    feats = jax.lax.stop_gradient(latent_stats.denormalize_arrays(z, frozen["mean"],
                                                                  frozen["std"]))

    def forward(params):
      out, inter = decoder.apply(
          {"params": params}, feats, mutable=["intermediates"],
          capture_intermediates=lambda mdl, method: mdl.name == "norm_out")
      return out, inter["intermediates"]["norm_out"]["__call__"][0]

    x_hat, decoder_vjp, pre_act = jax.vjp(forward, state.params, has_aux=True)
    h_last = jax.nn.silu(pre_act)
    nll_fn = lambda xh: reconstruction_nll(x, xh, frozen["lpips"], lpips_weight)  # noqa: E731
    (nll, l1, lp), nll_vjp = jax.vjp(nll_fn, x_hat)
    d_nll = nll_vjp((jnp.ones_like(nll), jnp.zeros_like(l1), jnp.zeros_like(lp)))[0]

    factor = jnp.where(state.step >= disc_start, disc_factor, 0.0).astype(jnp.float32)
    gan_on = factor > 0

    def gan_terms(_):
      def g_fn(xh):
        logits, stats = run_disc(state.disc_params, state.disc_stats, xh)
        return -jnp.mean(logits), stats
      (g_loss, stats), d_g = jax.value_and_grad(g_fn, has_aux=True)(x_hat)
      _, conv_vjp = jax.vjp(lambda w: _conv_out(h_last, w), state.params["conv_out"]["kernel"])
      weight = adaptive_weight(conv_vjp(d_nll)[0], conv_vjp(d_g)[0], disc_weight)

      def d_fn(dparams):
        real, s = run_disc(dparams, stats, jax.lax.stop_gradient(x))
        fake, s = run_disc(dparams, s, jax.lax.stop_gradient(x_hat))
        return factor * hinge_d_loss(real, fake), (s, jnp.mean(real), jnp.mean(fake))

      (d_loss, (s, real, fake)), d_grads = jax.value_and_grad(d_fn, has_aux=True)(
          state.disc_params)
      return g_loss, d_g, weight, d_loss, d_grads, s, real, fake

    def no_gan(_):
      zero = jnp.zeros((), jnp.float32)
      return (zero, jnp.zeros_like(x_hat), zero, zero,
              jax.tree.map(jnp.zeros_like, state.disc_params), state.disc_stats, zero, zero)

    g_loss, d_g, d_weight, d_loss, d_grads, stats, real, fake = jax.lax.cond(
        gan_on, gan_terms, no_gan, None)
    coef = d_weight * factor
    grads = decoder_vjp(d_nll + coef * d_g)[0]
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    d_updates, disc_opt_state = disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
    disc_params = optax.apply_updates(state.disc_params, d_updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              disc_params=disc_params, disc_stats=stats,
                              disc_opt_state=disc_opt_state)
    metrics = {"loss": nll + coef * g_loss, "nll": nll, "l1": l1, "g_loss": g_loss,
               "d_weight": d_weight, "disc_factor": factor, "d_loss": d_loss,
               "logits_real": real, "logits_fake": fake, "grad_norm": optax.tree.norm(grads),
               "disc_grad_norm": optax.tree.norm(d_grads), "lr": schedule(state.step)}
    # Without LPIPS weights nothing is measured: a logged 0 would read as a perfect score.
    if frozen["lpips"] is not None:
      metrics["lpips"] = lp
    return new_state, metrics

  return train_step
