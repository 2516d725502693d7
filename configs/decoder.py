"""Decoder training (`task = "decoder"`): the SVG pixel decoder behind a frozen DINOv3 (§3.3).

Variants (`--config configs/decoder.py:<variant>`):
  tiny         CPU demo: shapes images at 64 px, a random frozen ViT-S+ made from a seed with 8 px
               patches (an 8x8 latent grid; see below), a small decoder; the demo files are created
               under data.demo_dir on first use.
  stage1_256   official stage 1: 256 px, batch 64 x 8 GPUs, the released decoder architecture.
  stage2_512   official stage 2: 512 px (the file says 64 per GPU although its name says bs16).
  stage3_1024  official stage 3 (1024 px per its name; batch 3 x 8). Stage 3 officially trains at
               native aspect ratios from a JSONL; here images are center-cropped squares.
Official recipe in every variant: Adam(lr 1e-4, b1 0.5, b2 0.9) for decoder and discriminator,
no gradient clipping, no weight decay, fp32; loss L1 + 1.0 * LPIPS (sum over pixels / batch) +
hinge PatchGAN with the adaptive weight x 0.5 from disc_start = 2500 iterations (the official
5000 counts Lightning global steps, two per iteration). Later stages start from the previous stage's
decoder (`--config.train.init_from=<stage workdir>`); the step counts are not in the official repo.
Set data.jsonl / data.heldout_jsonl (official `{"path": ...}` lines), autoencoder.encoder_path and
stats_path, and loss.lpips_vgg_path (torchvision vgg16-397923af.pth) + loss.lpips_lin_path
(the lpips package's weights/v0.1/vgg.pth); without LPIPS weights training runs without the
LPIPS term.
"""
import ml_collections

from svg_jax import config as base


def _decoder_config() -> ml_collections.ConfigDict:
  c = base.base_config()
  c.task = "decoder"

  c.data.jsonl = ""  # training images (official jsonl: one {"path": ...} a line)
  c.data.heldout_jsonl = ""  # held-out images for the PSNR evaluation
  c.data.num_eval_images = 64  # the first N held-out images (0 = no evaluation)
  c.data.demo_dir = ""  # "" = no demo; else the demo files are made here (train/decoder_demo.py)
  c.data.demo_seed = 0
  c.data.demo_num_train = 2000
  c.data.demo_num_heldout = 128

  c.loss = ml_collections.ConfigDict()
  c.loss.lpips_vgg_path = ""  # torchvision VGG16 state dict
  c.loss.lpips_lin_path = ""  # lpips package weights/v0.1/vgg.pth
  c.loss.lpips_weight = 1.0
  c.loss.disc_weight = 0.5
  c.loss.disc_factor = 1.0
  c.loss.disc_start = 2500  # iterations (official: 5000 Lightning global steps)

  c.discriminator = ml_collections.ConfigDict(dict(
      in_channels=3, ndf=64, n_layers=3, bn_eps=1e-5, bn_momentum=0.1, leaky_slope=0.2))

  t = c.train
  t.lr, t.b1, t.b2, t.eps = 1e-4, 0.5, 0.9, 1e-8  # torch Adam
  t.weight_decay, t.grad_clip = 0.0, 0.0
  t.lr_schedule, t.warmup_steps = "constant", 0
  t.caption_dropout = 0.0  # unused by this task
  t.eval_every = 1000
  t.eval_batch_size = 16
  t.log_every = 50
  t.checkpoint_every = 2000
  return c


def _official(resolution: int, batch: int) -> ml_collections.ConfigDict:
  c = _decoder_config()
  c.data.resolution = resolution
  c.train.global_batch_size = batch
  c.train.num_steps = 200_000
  return c


def tiny() -> ml_collections.ConfigDict:
  c = _decoder_config()
  c.data.demo_dir = "/tmp/svg_jax_decoder_demo"
  c.data.resolution = 64
  c.data.num_eval_images = 64
  # 8 px patches: with the official 16 a 64 px image is a 4x4 grid and a random (near-linear) ViT
  # projects each 768-value patch onto 384 channels, losing half of it; held-out ground truth
  # through encoder + trained decoder then scored 0.45 on ShapesGenEval. 8 px patches (192 values
  # onto 384 channels, nothing lost) reach 0.96 with the same decoder budget.
  c.autoencoder.encoder.update(dict(patch_size=8, scan_layers=False))  # CPU: unrolled is faster
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


VARIANTS = {
    "tiny": tiny,
    "stage1_256": lambda: _official(256, 512),
    "stage2_512": lambda: _official(512, 512),
    "stage3_1024": lambda: _official(1024, 24),
}


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown decoder config variant {variant!r}; one of {sorted(VARIANTS)}")
  return VARIANTS[variant]()
