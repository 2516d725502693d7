"""CPU-sized DiT: the embedded default that trains on 2 CPU cores in minutes.

Usage: python launch/train.py --config configs/tiny.py [--config.train.num_steps=200]
"""
from svg_jax import config as base


def get_config():
  c = base.base_config()
  c.model.update(dict(
      # dim >= in_channels x patch_size^2: a narrower model cannot predict the noise part of the
      # velocity in the directions x_embedder drops (the trainer refuses such configs).
      in_channels=384, dim=384, n_layers=4, n_refiner_layers=1, n_heads=6, n_kv_heads=2,
      multiple_of=64, cap_feat_dim=128, axes_dims=(16, 24, 24), axes_lens=(600, 512, 512),
      # CPU: scan and remat each cost 15-25% (cpu_perf_calibration.md); they exist for memory.
      scan_layers=False, remat_policy="none", compute_dtype="float32"))
  # The demo's encoder (configs/decoder.py:tiny): 8 px patches, so 64 px images are 8x8 latents.
  c.autoencoder.encoder.patch_size = 8
  c.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  c.data.resolution = 64
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
