"""The demo's two models, sized to train on 2 shared CPU cores in minutes.

A `Preset` names everything the demo's size decides: the random encoder (and so the latent the DiT
learns), the decoder's and the DiT's size and budget. `decoder(preset)` is the pixel decoder
behind the preset's random frozen DINOv3 with 8 px patches, `dit(preset)` the DiT on that
encoder's latents. `configs/decoder.py:tiny` and `configs/tiny.py` return them for the command
line; the demo builds them here. Neither names a file: the demo passes the paths of the files it
makes (decoder_data.py, pipeline.py).
"""
from __future__ import annotations

import dataclasses

import ml_collections

from svg_jax import config as base
from svg_jax.input_errors import InputError

# 8 px patches: with the official 16 a 64 px image is a 4x4 grid and a random (near-linear) ViT
# projects each 768-value patch onto 384 channels, losing half of it; held-out ground truth
# through encoder + trained decoder then scored 0.45 on ShapesGenEval. 8 px patches (192 values
# onto 384 channels, nothing lost) reach 0.96 with the same decoder budget.
ENCODER_PATCH = 8
RESOLUTION = 64


@dataclasses.dataclass(frozen=True)
class Preset:
  """What the demo's size decides. The encoder is random, so its width and depth are free: they
  set the latent (channels = width) that the DiT must learn (docs/demo.md)."""
  encoder_dim: int
  encoder_depth: int
  encoder_heads: int
  decoder_steps: int
  dit_dim: int
  dit_layers: int
  dit_heads: int
  dit_kv_heads: int
  dit_axes_dims: tuple[int, int, int]
  dit_batch: int
  dit_lr: float
  dit_steps: int
  dit_ema_decay: float
  num_train: int
  layouts: str  # shapes.LAYOUTS: objects on jittered or on fixed template slots


PRESETS = {
    # The default (docs/demo.md: the candidates measured at equal wall time): a narrow, shallow
    # random encoder gives a 128-channel latent that a DiT 3x narrower learns from ~10x the
    # samples the full size sees in the same minutes.
    "small": Preset(encoder_dim=128, encoder_depth=4, encoder_heads=2, decoder_steps=400,
                    dit_dim=128, dit_layers=4, dit_heads=4, dit_kv_heads=2,
                    dit_axes_dims=(8, 12, 12), dit_batch=32, dit_lr=1e-3, dit_steps=4500,
                    dit_ema_decay=0.995, num_train=4000, layouts="fixed"),
    # The DINOv3 ViT-S+ width and depth (384 channels, 12 blocks) and a 16.7M DiT: the latent of
    # the real system's shape, for longer runs and GPUs (research/demo_scaling.py).
    "full": Preset(encoder_dim=384, encoder_depth=12, encoder_heads=6, decoder_steps=800,
                   dit_dim=384, dit_layers=4, dit_heads=6, dit_kv_heads=2,
                   dit_axes_dims=(16, 24, 24), dit_batch=16, dit_lr=5e-4, dit_steps=1000,
                   dit_ema_decay=0.99, num_train=2000, layouts="jittered"),
}
DEFAULT_PRESET = "small"


def preset(name: str) -> Preset:
  if name not in PRESETS:
    raise InputError(f"unknown demo preset {name!r}; one of {sorted(PRESETS)}")
  return PRESETS[name]


def _encoder(p: Preset) -> dict:
  # The ViT-S+ ratios (SwiGLU 4x width, 64-wide heads) at the preset's width and depth.
  return dict(patch_size=ENCODER_PATCH, dim=p.encoder_dim, depth=p.encoder_depth,
              num_heads=p.encoder_heads, ffn_hidden=4 * p.encoder_dim,
              scan_layers=False)  # CPU: unrolled is faster


def _decoder(p: Preset) -> dict:
  # 3 upsamplings: 8x, the encoder's patch.
  return dict(z_channels=p.encoder_dim, ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1,
              norm_groups=8)


def _autoencoder(section: ml_collections.ConfigDict, p: Preset) -> None:
  """The preset's encoder and decoder. Their statistics are the demo's own, computed from its
  images (the pipeline names the file), and the official training's bf16 rounding of them is
  not theirs to reproduce."""
  section.encoder.update(_encoder(p))
  section.decoder.update(_decoder(p))
  section.update(dict(stats_path="", bf16_stats=False))


def decoder(name: str = DEFAULT_PRESET, steps: int | None = None) -> ml_collections.ConfigDict:
  """The demo's decoder training: shapes images at 64 px, a small decoder, the official recipe;
  `steps` long (default: the preset's)."""
  p = preset(name)
  steps = p.decoder_steps if steps is None else int(steps)
  c = base.decoder_task_config()
  c.data.resolution = RESOLUTION
  c.data.num_eval_images = 64
  _autoencoder(c.autoencoder, p)
  c.discriminator.ndf = 16
  c.train.global_batch_size = 8
  c.train.num_steps = steps
  c.train.lr = 1e-3  # the official 1e-4 is for batch 512 and 10^5 steps; this run is minutes
  c.loss.disc_start = steps * 3 // 4  # the GAN term (official recipe) at the end
  c.train.eval_every = 100
  c.train.log_every = 25
  c.train.checkpoint_every = 200
  c.train.chip = "cpu"
  return c


def precompute(name: str = DEFAULT_PRESET) -> ml_collections.ConfigDict:
  """launch/precompute.py's job with the demo's encoder at 64 px and captions without the
  official system prompt, as the demo encodes its own records."""
  p = preset(name)
  c = base.precompute_job_config()
  _autoencoder(c.autoencoder, p)
  c.precompute.update(dict(resolution=RESOLUTION, min_side=RESOLUTION // 2, batch_size=64,
                           system_prompt="empty"))
  return c


def dit(name: str = DEFAULT_PRESET) -> ml_collections.ConfigDict:
  """The demo's DiT: 64 px images are 8x8 latents of the preset's encoder."""
  p = preset(name)
  c = base.dit_task_config()
  c.model.update(dict(
      # dim >= in_channels x patch_size^2: a narrower model cannot predict the noise part of the
      # velocity in the directions x_embedder drops (the trainer refuses such configs).
      in_channels=p.encoder_dim, dim=p.dit_dim, n_layers=p.dit_layers, n_refiner_layers=1,
      n_heads=p.dit_heads, n_kv_heads=p.dit_kv_heads, multiple_of=64, cap_feat_dim=128,
      axes_dims=p.dit_axes_dims, axes_lens=(600, 512, 512),
      # CPU: scan and remat each cost 15-25% (docs/cpu_performance.md); they exist for memory.
      scan_layers=False, remat_policy="none", compute_dtype="float32"))
  # decoder()'s encoder and decoder: a demo's exported decoder loads with this config alone.
  _autoencoder(c.autoencoder, p)
  c.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  c.data.resolution = RESOLUTION
  c.data.max_caption_len = 64
  c.train.global_batch_size = p.dit_batch
  c.train.num_steps = p.dit_steps
  c.train.lr = p.dit_lr
  c.train.lr_schedule = "warmup_constant"
  c.train.warmup_steps = 20
  c.train.ema_decay = p.dit_ema_decay
  c.train.log_every = 10
  c.train.checkpoint_every = 500
  return c
