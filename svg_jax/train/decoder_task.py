"""The decoder-training task of the shared loop (`task = "decoder"`, svg_jax/train/loop.py).

What it adds to the loop: the config checks, the state (decoder + PatchGAN discriminator with
their Adam states, svg_jax/train/decoder_step.py) with shardings from the logical axis names, the
frozen weights (DINOv3 encoder, latent statistics, LPIPS when configured) placed once, replicated,
on the mesh and passed to the jitted step as an argument (not baked into the program), the image
pipeline (svg_jax/data/image_pipeline.py), and the held-out evaluation: mean PSNR (dB, on uint8
images, per image then averaged) of encode -> decode reconstructions of the first
`data.num_eval_images` images of `data.heldout_jsonl`, every `train.eval_every` steps and at the
end. (Every metrics row also carries `bad_records`, the bad training images the loader replaced:
the loop's, from the loader's `stats`.)

FLOPs per step for the throughput line come from XLA's cost analysis of the lowered step (done
once), there being no closed form worth maintaining for encoder + decoder + LPIPS + discriminator.
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from svg_jax import checkpoint as ckpt_lib
from svg_jax import latent_stats, parallel
from svg_jax.autoencoder import to_uint8
from svg_jax.eval.image_metrics import psnr
from svg_jax.input_errors import InputError
from svg_jax.convert import decoder_io
from svg_jax.convert.dinov3 import load_dinov3
from svg_jax.convert.lpips import load_lpips
from svg_jax.data import image_pipeline
from svg_jax.models.decoder import Decoder, DecoderConfig
from svg_jax.models.dinov3 import DINOv3Config
from svg_jax.models.discriminator import DiscriminatorConfig, NLayerDiscriminator
from svg_jax.train import decoder_step
from svg_jax.train import metrics as metrics_lib
from svg_jax.train import state as state_lib
from svg_jax.train import task_api
from svg_jax.utils.rounding import round_up

SECTIONS = ("loss", "discriminator")
DATA_FIELDS = ("jsonl", "heldout_jsonl", "num_eval_images", "crop")


def config_problems(config, process_count: int) -> list[str]:
  """Everything about a decoder config that can be checked without compiling (the loop has
  checked the batch against the processes; the image pipeline needs nothing more of them)."""
  del process_count
  problems = []
  missing = [s for s in SECTIONS if s not in config]
  missing += [f"data.{f}" for f in DATA_FIELDS if f not in config.data]
  missing += [f"train.{f}" for f in ("eval_every", "eval_batch_size") if f not in config.train]
  if missing:
    return [f"the decoder task needs config fields {missing} (start from configs/decoder.py)"]
  ae = config.autoencoder
  enc_cfg = dec_cfg = None
  try:
    enc_cfg = DINOv3Config.from_dict(ae.encoder.to_dict())
    enc_cfg.validate()
  except ValueError as e:
    problems.append(f"autoencoder.encoder: {e}")
  try:
    dec_cfg = DecoderConfig.from_dict(ae.decoder.to_dict())
    dec_cfg.validate()
  except ValueError as e:
    problems.append(f"autoencoder.decoder: {e}")
  try:
    DiscriminatorConfig.from_dict(config.discriminator.to_dict()).validate()
  except (ValueError, TypeError) as e:
    problems.append(f"discriminator: {e}")
  if enc_cfg is not None and dec_cfg is not None:
    if dec_cfg.z_channels != enc_cfg.dim:
      problems.append(f"autoencoder.decoder.z_channels {dec_cfg.z_channels} != encoder dim "
                      f"{enc_cfg.dim}")
    if dec_cfg.upsample_factor != enc_cfg.patch_size:
      problems.append(f"the decoder upsamples {dec_cfg.upsample_factor}x but the encoder patch is "
                      f"{enc_cfg.patch_size}: reconstructions would not have the image size")
    res = int(config.data.resolution)
    if res < 1:
      problems.append(f"data.resolution must be >= 1, got {res}")
    elif res % enc_cfg.patch_size:
      problems.append(f"data.resolution {res} is not a multiple of the patch size "
                      f"{enc_cfg.patch_size}")
  for field, what in (("encoder_path", "DINOv3 weights"), ("stats_path", "latent statistics")):
    path = ae[field]
    if not path:
      problems.append(f"autoencoder.{field} is empty (the {what})")
    elif not os.path.exists(path):
      problems.append(f"autoencoder.{field} {path!r} does not exist")
  loss = config.loss
  vgg, lin = loss.lpips_vgg_path, loss.lpips_lin_path
  if bool(vgg) != bool(lin):
    problems.append("set both loss.lpips_vgg_path and loss.lpips_lin_path, or neither "
                    "(then training runs without LPIPS)")
  for name, path in (("lpips_vgg_path", vgg), ("lpips_lin_path", lin)):
    if path and not os.path.isfile(path):
      problems.append(f"loss.{name} {path!r} does not exist")
  for name in ("lpips_weight", "disc_weight", "disc_factor", "disc_start"):
    if float(loss[name]) < 0:
      problems.append(f"loss.{name} must be >= 0, got {loss[name]}")
  d = config.data
  if int(d.num_eval_images) < 0:
    problems.append(f"data.num_eval_images must be >= 0 (0 = no evaluation), got "
                    f"{d.num_eval_images}")
  if int(d.num_threads) < 1 or int(d.prefetch) < 1:
    problems.append(f"data.num_threads and data.prefetch must be >= 1, got {d.num_threads} and "
                    f"{d.prefetch}")
  if int(d.max_bad_in_a_row) < 1:
    problems.append(f"data.max_bad_in_a_row must be >= 1, got {d.max_bad_in_a_row}")
  if d.crop not in image_pipeline.CROPS:
    problems.append(f"data.crop {d.crop!r} is not one of {image_pipeline.CROPS}")
  if int(int(d.min_side)) < 1:
    problems.append(f"data.min_side must be >= 1, got {int(d.min_side)}")
  if int(d.num_workers) < 0:
    problems.append(f"data.num_workers must be >= 0, got {d.num_workers}")
  if not d.jsonl:
    problems.append("data.jsonl is empty (the training image list)")
  else:
    problems += _list_problems("data.jsonl", d.jsonl)
  if int(d.num_eval_images) > 0:
    if not d.heldout_jsonl:
      problems.append("data.heldout_jsonl is empty but data.num_eval_images > 0")
    else:
      problems += _list_problems("data.heldout_jsonl", d.heldout_jsonl)
    if int(config.train.eval_every) < 1:
      problems.append(f"train.eval_every must be >= 1, got {config.train.eval_every}")
    if int(config.train.eval_batch_size) < 1:
      problems.append(f"train.eval_batch_size must be >= 1, got {config.train.eval_batch_size}")
  if int(config.train.micro_batches) != 1:
    problems.append("train.micro_batches must be 1 for the decoder task (the adaptive GAN weight "
                    "is a function of the whole batch's gradients)")
  return problems


def _list_problems(field: str, path: str) -> list[str]:
  if os.path.isdir(path):
    return [f"{field} {path!r} is a folder, not a jsonl file (one {{\"path\": ...}} line per "
            "image)"]
  if not os.path.isfile(path):
    return [f"{field} {path!r} does not exist"]
  return []


def _pipeline_config(config) -> image_pipeline.ImagePipelineConfig:
  d = config.data
  return image_pipeline.ImagePipelineConfig(
      per_process_batch_size=int(config.train.global_batch_size) // jax.process_count(),
      resolution=int(d.resolution), seed=int(d.shuffle_seed),
      num_threads=int(d.num_threads), prefetch_buffer_size=int(d.prefetch), crop=d.crop,
      max_bad_in_a_row=int(d.max_bad_in_a_row), min_side=int(d.min_side),
      num_workers=int(d.num_workers))


def make_data_iterator(config):
  return image_pipeline.make_image_pipeline(config.data.jsonl, _pipeline_config(config))


class DecoderMetricsLogger(metrics_lib.MetricsLogger):
  """The shared logger with the decoder's metric set: every metric is averaged over the log window
  (lr: its last value)."""

  def _accumulate(self, host_metrics):
    acc = self._acc or _WindowMean()
    acc.update({k: float(np.asarray(v)) for k, v in host_metrics.items()})
    self._acc = acc


class _WindowMean:
  """Means over a log window (what `compute` of clu's Average gives); lr keeps its last value."""

  def __init__(self):
    self.sums, self.count, self.last = {}, 0, {}

  def update(self, values: dict) -> None:
    for k, v in values.items():
      self.sums[k] = self.sums.get(k, 0.0) + v
    self.last = values
    self.count += 1

  def compute(self) -> dict:
    out = {k: v / self.count for k, v in self.sums.items()}
    if "lr" in self.last:
      out["lr"] = self.last["lr"]
    return out


class DecoderSetup:
  """Decoder + discriminator state, frozen weights, jitted init / step / eval on one mesh."""

  logger_class = DecoderMetricsLogger
  saved_facts: dict = {}  # the decoder's data holds images, nothing a reader needs besides config
  _lpips_notice_given = False  # "training without LPIPS" is said once per process

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    self.rules = config.axis_rules
    ae = config.autoencoder
    self.encoder_cfg = DINOv3Config.from_dict(ae.encoder.to_dict())
    self.decoder_cfg = DecoderConfig.from_dict(ae.decoder.to_dict())
    self.disc_cfg = DiscriminatorConfig.from_dict(config.discriminator.to_dict())
    self.tx = state_lib.make_optimizer(config.train)
    self.disc_tx = state_lib.make_optimizer(config.train)
    res = int(config.data.resolution)
    lat = res // self.encoder_cfg.patch_size
    decoder, disc = Decoder(self.decoder_cfg), NLayerDiscriminator(self.disc_cfg)
    z = jnp.zeros((1, lat, lat, self.decoder_cfg.z_channels), jnp.float32)
    img = jnp.zeros((2, res, res, self.disc_cfg.in_channels), jnp.float32)

    def boxed_state(rng):
      k_dec, k_disc = jax.random.split(rng)
      return decoder_step.create_state(decoder.init(k_dec, z)["params"],
                                       disc.init(k_disc, img, True), self.tx, self.disc_tx)

    boxed = jax.eval_shape(boxed_state, jax.random.PRNGKey(0))
    self.state_shardings, self.abstract_state = state_lib.sharded_abstract_state(
        boxed, mesh, self.rules)
    self._init = jax.jit(lambda rng: state_lib.unbox(boxed_state(rng)),
                         out_shardings=self.state_shardings)

    def from_params(params, rng):
      fresh = state_lib.unbox(boxed_state(rng))
      return fresh.replace(params=params, opt_state=self.tx.init(params))

    self._from_params = jax.jit(from_params,
                                in_shardings=(self.state_shardings.params,
                                              parallel.replicated(mesh)),
                                out_shardings=self.state_shardings)

    self.repl = parallel.replicated(mesh)
    self.frozen = self._load_frozen(config)
    self._batch_sh = {"image": parallel.batch_sharding(mesh, 4)}
    step = decoder_step.make_train_step(self.encoder_cfg, self.decoder_cfg, self.disc_cfg,
                                        self.tx, self.disc_tx, config.loss, config.train,
                                        bool(ae.bf16_stats))
    self._step = jax.jit(step, in_shardings=(self.state_shardings, self._batch_sh, self.repl,
                                             self.repl),
                         out_shardings=(self.state_shardings, self.repl), donate_argnums=0)
    reconstruct = decoder_step.make_reconstruct(self.encoder_cfg, self.decoder_cfg,
                                                bool(ae.bf16_stats))
    self._reconstruct = jax.jit(reconstruct, in_shardings=(
        self.state_shardings.params, self.repl, self._batch_sh["image"]),
        out_shardings=self.repl)
    self._flops = None
    t = config.train
    self.eval_every = int(t.eval_every)
    self.eval_images = None
    if int(config.data.num_eval_images) > 0:
      self.eval_images = image_pipeline.load_eval_images(
          config.data.heldout_jsonl, res, int(config.data.num_eval_images),
          int(config.data.min_side))

  # ------------------------------------------------------------------------------ frozen weights

  def _load_frozen(self, config) -> dict:
    ae, loss = config.autoencoder, config.loss
    stats = latent_stats.load_latent_stats(ae.stats_path, int(ae.stats_layer))
    if stats.dim != self.encoder_cfg.dim:
      raise InputError(f"autoencoder.stats_path {ae.stats_path} holds statistics of "
                       f"{stats.dim} channels, but the encoder has {self.encoder_cfg.dim} "
                       "(autoencoder.encoder.dim): use the statistics computed for this encoder")
    encoder = load_dinov3(ae.encoder_path, self.encoder_cfg, prefix=ae.encoder_prefix)
    lpips = None
    if loss.lpips_vgg_path and loss.lpips_lin_path:
      lpips = load_lpips(loss.lpips_vgg_path, loss.lpips_lin_path)
      logging.info("LPIPS from %s and %s, weight %s", loss.lpips_vgg_path, loss.lpips_lin_path,
                   loss.lpips_weight)
    elif not DecoderSetup._lpips_notice_given:
      DecoderSetup._lpips_notice_given = True
      logging.warning("no LPIPS weights configured (loss.lpips_vgg_path / loss.lpips_lin_path): "
                      "training without the LPIPS term (L1 + GAN only)")
    frozen = {"encoder": encoder, "mean": np.asarray(stats.mean, np.float32),
              "std": np.asarray(stats.std, np.float32), "lpips": lpips}
    return jax.tree.map(lambda x: jax.device_put(np.asarray(x), self.repl), frozen)

  # ------------------------------------------------------------------------------ the task API

  def init_state(self, seed: int):
    return self._init(jax.random.PRNGKey(seed))

  def state_from_params(self, params):
    """A fresh state (optimizers, discriminator from the config seed) around given decoder
    params: a later stage starts from an earlier stage's decoder."""
    return self._from_params(params, jax.random.PRNGKey(int(self.config.seed)))

  # The loop's init_from line.
  init_from_note = "the discriminator starts afresh from `seed`, off for loss.disc_start steps"

  def load_init_params(self, source: str, fmt: str, step: int | None):
    """(decoder params on the state's shardings, step read or None) of `train.init_from`: a
    training workdir's decoder (fmt "") read straight into its shards, or weights in a
    `decoder_io` format (the official autoencoder's decoder, ...) read on the host."""
    abstract = self.abstract_state.params
    if not fmt:
      return ckpt_lib.load_params(source, abstract, step, task="decoder")
    params = decoder_io.load_decoder_weights(source, fmt, self.decoder_cfg)
    return ckpt_lib.place_params(params, abstract,
                                 f"train.init_from {source}: its decoder params"), None

  def compile_step(self, state, batch, rng):
    compiled = self._step.lower(state, batch, rng, self.frozen).compile()
    return lambda state, batch, rng: compiled(state, batch, rng, self.frozen)

  def device_batch(self, local_batch: dict) -> dict:
    return parallel.global_batch({"image": local_batch["image"]}, self.mesh)

  def make_data_iterator(self):
    return make_data_iterator(self.config)

  def batch_counts(self, local_batch: dict) -> tuple[int, int, float]:
    gb = int(self.config.train.global_batch_size)
    _, h, w = local_batch["image"].shape[:3]
    p = self.encoder_cfg.patch_size
    if self._flops is None:
      self._flops = self._step_flops(local_batch)
    return gb, gb * (h // p) * (w // p), self._flops

  def _step_flops(self, local_batch: dict) -> float:
    shape = (int(self.config.train.global_batch_size),) + local_batch["image"].shape[1:]
    batch = {"image": jax.ShapeDtypeStruct(shape, local_batch["image"].dtype)}
    try:
      with parallel.mesh_context(self.mesh, self.rules):
        cost = self._step.lower(self.abstract_state, batch, jax.random.PRNGKey(0),
                                self.frozen).cost_analysis()
      cost = cost[0] if isinstance(cost, list) else cost
      return float(cost.get("flops", 0.0))  # the lowered (unpartitioned) program: global FLOPs
    except Exception as e:  # throughput numbers are not worth failing a run for
      logging.warning("no FLOP count for the decoder step (%s)", e)
      return 0.0

  def poison(self, local_batch: dict) -> dict:
    return {"image": np.full(local_batch["image"].shape, np.nan, np.float32)}

  def eval_due(self, step: int, at_end: bool) -> bool:
    return self.eval_images is not None and (step % self.eval_every == 0 or at_end)

  def _eval_chunk(self) -> int:
    """Images per reconstruction call: train.eval_batch_size rounded up to the batch split."""
    return round_up(int(self.config.train.eval_batch_size), parallel.batch_axis_size(self.mesh))

  def compile_eval(self, state) -> None:
    if self.eval_images is None:
      return
    part = np.zeros((self._eval_chunk(),) + self.eval_images.shape[1:], self.eval_images.dtype)
    with parallel.mesh_context(self.mesh, self.rules):
      self._reconstruct.lower(state.params, self.frozen,
                              jax.device_put(part, self._batch_sh["image"])).compile()

  def reconstruct(self, params, images: np.ndarray) -> np.ndarray:
    """uint8 images -> reconstructions in about [-1, 1] (host fp32), in padded chunks."""
    chunk = self._eval_chunk()
    outs = []
    for start in range(0, len(images), chunk):
      part = images[start:start + chunk]
      k = len(part)
      if k < chunk:
        part = np.concatenate([part, np.zeros((chunk - k,) + part.shape[1:], part.dtype)])
      part = jax.device_put(part, self._batch_sh["image"])
      outs.append(np.asarray(jax.device_get(self._reconstruct(params, self.frozen, part)))[:k])
    return np.concatenate(outs)

  def evaluate(self, state, step: int) -> dict:
    del step
    with parallel.mesh_context(self.mesh, self.rules):
      rec = to_uint8(self.reconstruct(state.params, self.eval_images))
    values = [psnr(a, b) for a, b in zip(self.eval_images, rec)]
    finite = [v for v in values if math.isfinite(v)]
    mean = float(np.mean(finite)) if finite else math.inf
    return {"heldout_psnr": mean, "heldout_images": len(values)}


TASK = task_api.Task(name="decoder", config_problems=config_problems, make_setup=DecoderSetup)
