"""The demo's two models, sized to train on 2 shared CPU cores in minutes.

`decoder()` is the pixel decoder behind a random frozen DINOv3 with 8 px patches, `dit()` the DiT
on that encoder's latents. `configs/decoder.py:tiny` and `configs/tiny.py` return them for the
command line; the demo builds them here. Neither names a file: the demo passes the paths of the
files it makes (decoder_data.py, pipeline.py).
"""
import ml_collections

from svg_jax import config as base

# 8 px patches: with the official 16 a 64 px image is a 4x4 grid and a random (near-linear) ViT
# projects each 768-value patch onto 384 channels, losing half of it; held-out ground truth
# through encoder + trained decoder then scored 0.45 on ShapesGenEval. 8 px patches (192 values
# onto 384 channels, nothing lost) reach 0.96 with the same decoder budget.
ENCODER_PATCH = 8
RESOLUTION = 64


def decoder() -> ml_collections.ConfigDict:
  """The demo's decoder training: shapes images at 64 px, a small decoder, the official recipe."""
  c = base.decoder_task_config()
  c.data.resolution = RESOLUTION
  c.data.num_eval_images = 64
  c.autoencoder.encoder.update(dict(patch_size=ENCODER_PATCH,
                                    scan_layers=False))  # CPU: unrolled is faster
  c.autoencoder.decoder.update(dict(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1,
                                    norm_groups=8))  # 3 upsamplings: 8x, the encoder's patch
  c.discriminator.ndf = 16
  c.train.global_batch_size = 8
  # About 10 minutes on 2 shared CPU cores (the held-out PSNR passes 25 dB after ~300 steps).
  c.train.num_steps = 800
  c.train.lr = 1e-3  # the official 1e-4 is for batch 512 and 10^5 steps; this run is minutes
  c.loss.disc_start = 600  # the GAN term (official recipe) for the last quarter of the run
  c.train.eval_every = 100
  c.train.log_every = 25
  c.train.checkpoint_every = 200
  c.train.chip = "cpu"
  return c


def dit() -> ml_collections.ConfigDict:
  """The demo's DiT: 64 px images are 8x8 latents of the demo encoder."""
  c = base.base_config()
  c.model.update(dict(
      # dim >= in_channels x patch_size^2: a narrower model cannot predict the noise part of the
      # velocity in the directions x_embedder drops (the trainer refuses such configs).
      in_channels=384, dim=384, n_layers=4, n_refiner_layers=1, n_heads=6, n_kv_heads=2,
      multiple_of=64, cap_feat_dim=128, axes_dims=(16, 24, 24), axes_lens=(600, 512, 512),
      # CPU: scan and remat each cost 15-25% (docs/cpu_performance.md); they exist for memory.
      scan_layers=False, remat_policy="none", compute_dtype="float32"))
  c.autoencoder.encoder.patch_size = ENCODER_PATCH  # the decoder()'s encoder
  c.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  c.data.resolution = RESOLUTION
  c.data.max_caption_len = 64
  c.train.global_batch_size = 16
  c.train.num_steps = 300
  c.train.lr = 5e-4
  c.train.lr_schedule = "warmup_constant"
  c.train.warmup_steps = 20
  c.train.ema_decay = 0.99  # ~100-step horizon for runs of a few hundred steps
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  return c
