"""Decoder training: LPIPS against the `lpips` package, the PatchGAN discriminator and the step
against the official loss in torch (taming-transformers' discriminator and GAN loss, diffusers'
decoder, the `lpips` package), and the shared loop on the demo (falling loss,
held-out PSNR, checkpoints and resume through launch/train.py)."""
import dataclasses
import json
import os
import re
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from diffusers.models.autoencoders.vae import Decoder as TorchDecoder

import local_hosts
import script_runs
from lowerings import lowered_programs
from svg_jax import checkpoint as ckpt_lib
from svg_jax import parallel
from svg_jax.convert import decoder as dec_conv
from svg_jax.convert import lpips as lpips_conv
from svg_jax.demo import decoder_data
from svg_jax.models import lpips as lpips_model
from svg_jax.models.decoder import Decoder, DecoderConfig
from svg_jax.models.dinov3 import DINOv3Config, DINOv3ViT
from svg_jax.models.discriminator import DiscriminatorConfig, NLayerDiscriminator
from svg_jax.train import decoder_step, decoder_task
from svg_jax.train import loop, trainer

from configs import decoder as decoder_configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- LPIPS


def _torchvision_vgg16_features() -> torch.nn.Sequential:
  """VGG16 `features` in torchvision's layer layout (indices 0..30), random weights."""
  layers, cin = [], 3
  for entry in lpips_model.VGG16_LAYOUT:
    if isinstance(entry, str):
      layers.append(torch.nn.MaxPool2d(2, 2))
      continue
    layers += [torch.nn.Conv2d(cin, entry[1], 3, padding=1), torch.nn.ReLU(inplace=True)]
    cin = entry[1]
  layers.append(torch.nn.MaxPool2d(2, 2))
  return torch.nn.Sequential(*layers)


@pytest.fixture
def lpips_package(monkeypatch):
  """The `lpips` package. torchvision cannot be installed beside this torch, so when it is absent
  `torchvision.models.vgg16` is provided by the layout above (LPIPS itself is the package's)."""
  try:
    import torchvision  # noqa: F401
  except ImportError:
    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")

    def vgg16(pretrained=False, **kwargs):
      assert not pretrained, "no pretrained weights offline"
      return types.SimpleNamespace(features=_torchvision_vgg16_features())

    models.vgg16 = vgg16
    tv.models = models
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    for name in [m for m in sys.modules if m == "lpips" or m.startswith("lpips.")]:
      monkeypatch.delitem(sys.modules, name)
  import lpips
  return lpips


def _package_states(net) -> tuple[dict, dict]:
  """The package model's weights in the two standard file layouts (torchvision, lpips vgg.pth)."""
  vgg, lin = {}, {}
  for key, value in net.state_dict().items():
    if key.startswith("net.slice"):
      idx, kind = key.split(".")[-2:]
      vgg[f"features.{idx}.{kind}"] = value.numpy()
    elif key.startswith("lin") and not key.startswith("lins."):  # `lins` aliases the same heads
      lin[key] = value.numpy()
  return vgg, lin


def test_lpips_matches_the_lpips_package(lpips_package, tmp_path):
  torch.manual_seed(0)
  net = lpips_package.LPIPS(pretrained=False, net="vgg", pnet_rand=True, verbose=False).eval()
  with torch.no_grad():
    for k in range(5):  # the package initialises its heads at random too; make them positive
      getattr(net, f"lin{k}").model[1].weight.uniform_(0.0, 0.2)
  vgg, lin = _package_states(net)
  # Through the files: torchvision's file is legacy-serialized (the loader's torch fallback),
  # the heads' file in the zip format.
  torch.save({k: torch.from_numpy(v) for k, v in vgg.items()} | {
      "classifier.0.weight": torch.zeros(4, 4)}, tmp_path / "vgg16.pth",
      _use_new_zipfile_serialization=False)
  torch.save({k: torch.from_numpy(v) for k, v in lin.items()}, tmp_path / "vgg.pth")
  params = lpips_conv.load_lpips(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
  # The package's own published heads (legacy-serialized) read with the expected keys and shapes.
  published = lpips_conv.read_state(os.path.join(os.path.dirname(lpips_package.__file__),
                                                 "weights", "v0.1", "vgg.pth"))
  assert {k: v.shape for k, v in published.items()} == lpips_conv.lin_shapes()

  rng = np.random.default_rng(0)
  a = rng.uniform(-1, 1, (3, 48, 40, 3)).astype(np.float32)
  b = np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)
  with torch.no_grad():
    ta, tb = (torch.from_numpy(x.transpose(0, 3, 1, 2)) for x in (a, b))
    want = net(ta, tb).numpy().reshape(-1)
    want_feats = net.net(net.scaling_layer(ta))
  got = np.asarray(lpips_model.LPIPS().apply({"params": params}, a, b))
  feats = lpips_model.VGG16Features().apply(
      {"params": params["vgg"]},
      (a - np.asarray(lpips_model.SHIFT, np.float32)) / np.asarray(lpips_model.SCALE, np.float32))
  for ours, theirs in zip(feats, want_feats):
    theirs = theirs.numpy().transpose(0, 2, 3, 1)
    err = np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs))
    print(f"VGG16 tap {theirs.shape}: max rel err {err:.2e}")
    assert err < 1e-5
  print(f"LPIPS {want}: max abs err {np.max(np.abs(got - want)):.2e}")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert np.all(want > 0)


def test_lpips_files_with_wrong_keys_are_errors(tmp_path):
  vgg = {k: np.zeros(s, np.float32) for k, s in lpips_conv.vgg_shapes().items()}
  lin = {k: np.zeros(s, np.float32) for k, s in lpips_conv.lin_shapes().items()}
  del vgg["features.28.bias"]
  vgg["features.30.weight"] = np.zeros((1,), np.float32)
  lin["lin0.model.1.weight"] = np.zeros((1, 32, 1, 1), np.float32)
  with pytest.raises(ValueError, match=r"missing keys: features.28.bias; unexpected keys: "
                     r"features.30.weight"):
    lpips_conv.to_params(vgg, lin)
  del vgg["features.30.weight"]
  vgg["features.28.bias"] = np.zeros((512,), np.float32)
  with pytest.raises(ValueError, match=r"mis-shaped keys: lin0.model.1.weight \(1, 32, 1, 1\)"):
    lpips_conv.to_params(vgg, lin)


# ----------------------------------------------------------------------------- discriminator


@pytest.fixture
def taming_losses(lpips_package):
  """taming-transformers' GAN loss module (`hinge_d_loss`, `adopt_weight`, the VQGAN adaptive
  weight), which the official decoder loss imports. Its LPIPS module needs torchvision at import,
  which `lpips_package` provides where it is absent; the LPIPS itself is never built here."""
  from taming.modules.losses import vqperceptual
  return vqperceptual


def _taming_discriminator(cfg: DiscriminatorConfig, variables: dict) -> torch.nn.Module:
  """taming's own NLayerDiscriminator at `cfg`'s size, in train mode, holding our variables
  (`copy_` refuses a tensor of another shape, so a wrong channel plan fails here)."""
  from taming.modules.discriminator.model import NLayerDiscriminator as TamingDiscriminator
  net = TamingDiscriminator(input_nc=cfg.in_channels, ndf=cfg.ndf, n_layers=cfg.n_layers).train()
  convs, norms = _taming_layers(net)
  p = variables["params"]
  with torch.no_grad():
    for i, conv in enumerate(convs):
      conv.weight.copy_(torch.tensor(np.asarray(p[f"conv_{i}"]["kernel"]).transpose(3, 2, 0, 1)))
      if conv.bias is not None:
        conv.bias.copy_(torch.tensor(np.asarray(p[f"conv_{i}"]["bias"])))
    for i, bn in enumerate(norms, 1):
      bn.weight.copy_(torch.tensor(np.asarray(p[f"norm_{i}"]["scale"])))
      bn.bias.copy_(torch.tensor(np.asarray(p[f"norm_{i}"]["bias"])))
      bn.running_mean.copy_(torch.tensor(np.asarray(variables["batch_stats"][f"norm_{i}"]["mean"])))
      bn.running_var.copy_(torch.tensor(np.asarray(variables["batch_stats"][f"norm_{i}"]["var"])))
  assert len(convs) == len(p) - len(norms) and len(norms) == len(variables["batch_stats"])
  return net


def _taming_layers(net) -> tuple[list, list]:
  return ([m for m in net.main if isinstance(m, torch.nn.Conv2d)],
          [m for m in net.main if isinstance(m, torch.nn.BatchNorm2d)])


def _as_our_discriminator(net, grads: dict | None = None) -> tuple[dict, dict]:
  """(params, batch_stats) in our layout from taming's net; with `grads` (parameter -> its
  gradient), the gradients in place of the parameters."""
  value = (lambda t: grads[t]) if grads is not None else (lambda t: t)  # noqa: E731
  convs, norms = _taming_layers(net)
  params = {}
  for i, conv in enumerate(convs):
    params[f"conv_{i}"] = {"kernel": value(conv.weight).detach().numpy().transpose(2, 3, 1, 0)}
    if conv.bias is not None:
      params[f"conv_{i}"]["bias"] = value(conv.bias).detach().numpy()
  for i, bn in enumerate(norms, 1):
    params[f"norm_{i}"] = {"scale": value(bn.weight).detach().numpy(),
                           "bias": value(bn.bias).detach().numpy()}
  stats = {f"norm_{i}": {"mean": bn.running_mean.numpy().copy(),
                         "var": bn.running_var.numpy().copy()} for i, bn in enumerate(norms, 1)}
  return params, stats


def test_discriminator_matches_taming_in_train_mode():
  cfg = DiscriminatorConfig(ndf=8, n_layers=3)
  model = NLayerDiscriminator(cfg)
  x = np.random.default_rng(1).uniform(-1, 1, (4, 40, 40, 3)).astype(np.float32)
  variables = jax.device_get(nn.unbox(model.init(jax.random.PRNGKey(0), x, True)))
  p = variables["params"]
  # taming's weights_init: conv kernels N(0, 0.02), BatchNorm scale N(1, 0.02).
  k = np.concatenate([np.ravel(p[f"conv_{i}"]["kernel"]) for i in range(5)])
  assert abs(np.std(k) - 0.02) < 0.002 and abs(np.mean(k)) < 0.002
  s = np.concatenate([np.ravel(p[f"norm_{i}"]["scale"]) for i in range(1, 4)])
  assert abs(np.mean(s) - 1) < 0.01 and 0.01 < np.std(s) < 0.03

  net = _taming_discriminator(cfg, variables)
  with torch.no_grad():
    want = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  got, new = model.apply(variables, x, True, mutable=["batch_stats"])
  print(f"logits {want.shape}: max abs err {np.max(np.abs(np.asarray(got) - want)):.2e}")
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # Running averages (torch momentum 0.1, unbiased variance).
  assert _max_rel(jax.device_get(new["batch_stats"]), _as_our_discriminator(net)[1]) < 1e-5
  net.eval()  # eval mode uses the running averages
  with torch.no_grad():
    want_eval = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  got_eval = model.apply({"params": p, "batch_stats": new["batch_stats"]}, x, False)
  np.testing.assert_allclose(np.asarray(got_eval), want_eval, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the step

ENC = DINOv3Config(patch_size=4, dim=16, depth=1, num_heads=2, ffn_hidden=32, num_register_tokens=1,
                   scan_layers=False)
DEC = DecoderConfig(z_channels=16, ch=8, ch_mult=(1, 2, 2), num_res_blocks=0, norm_groups=4)
DISC = DiscriminatorConfig(ndf=8, n_layers=2)
DISC_WEIGHT = 0.5


def _loss_cfg(disc_start, lpips_weight=1.0):
  return types.SimpleNamespace(lpips_weight=lpips_weight, disc_weight=DISC_WEIGHT, disc_factor=1.0,
                               disc_start=disc_start)


def _train_cfg():
  return types.SimpleNamespace(lr=1e-3, warmup_steps=0, lr_schedule="constant", num_steps=10)


def _step_inputs(lpips_net):
  """uint8 images, decoder params, discriminator variables and the frozen inputs (encoder,
  statistics, and LPIPS: `lpips_net`'s weights, a model of the `lpips` package)."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  enc = jax.device_get(DINOv3ViT(ENC).init(k[0], np.zeros((1, 16, 16, 3), np.float32))["params"])
  dec = Decoder(DEC).init(k[1], np.zeros((1, 4, 4, 16), np.float32))["params"]
  disc = NLayerDiscriminator(DISC).init(k[2], np.zeros((2, 16, 16, 3), np.float32), True)
  unbox = lambda t: jax.device_get(nn.unbox(t))  # noqa: E731
  lp = lpips_conv.to_params(*_package_states(lpips_net))
  frozen = {"encoder": unbox(enc), "mean": rng.normal(0, 0.1, 16).astype(np.float32),
            "std": rng.uniform(0.5, 1.5, 16).astype(np.float32), "lpips": lp}
  return images, unbox(dec), unbox(disc), frozen


def _official_step_in_torch(vq, lpips_net, images, dec, disc_vars, frozen, step: int,
                            disc_start: int, lpips_weight: float) -> dict:
  """One iteration of the official decoder training (docs/reference.md §3.3) in torch, from
  the packages it is built of: diffusers' decoder, the `lpips` package's LPIPS, taming's
  discriminator, hinge loss, `adopt_weight` and VQGAN adaptive weight. The loss lines between
  them (L1 + LPIPS, nll = rec / exp(logvar) + logvar with logvar 0, summed over pixels / batch)
  are the official contperceptual loss's. The generator pass, then the discriminator pass on
  detached inputs (its optimizer zeroes the generator's gradients first). The decoder's input
  is our frozen encoder's (its parity with transformers is tests/test_dinov3.py's)."""
  from svg_jax.autoencoder import encode_images
  feats = np.asarray(encode_images(frozen["encoder"], frozen["mean"], frozen["std"], images, ENC))
  feats = feats * frozen["std"] + frozen["mean"]
  tdec = TorchDecoder(**dec_conv.diffusers_config(DEC)).train()
  tdec.load_state_dict({k: torch.from_numpy(np.array(v))
                        for k, v in dec_conv.params_to_diffusers(dec, DEC).items()})
  tdisc = _taming_discriminator(DISC, disc_vars)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
  xh = tdec(torch.from_numpy(feats.transpose(0, 3, 1, 2).copy()))
  rec = torch.abs(x - xh) + lpips_weight * lpips_net(x, xh)
  logvar = torch.zeros(())
  nll = torch.sum(rec / torch.exp(logvar) + logvar) / x.shape[0]
  g = -torch.mean(tdisc(xh))
  d_weight = vq.VQLPIPSWithDiscriminator.calculate_adaptive_weight(
      types.SimpleNamespace(discriminator_weight=DISC_WEIGHT), nll, g,
      last_layer=tdec.conv_out.weight)
  factor = vq.adopt_weight(1.0, step, threshold=disc_start)
  loss = nll + d_weight * factor * g
  names, tensors = zip(*tdec.named_parameters())
  dec_grads = dec_conv.diffusers_to_params(
      {n: t.numpy() for n, t in zip(names, torch.autograd.grad(loss, tensors))}, DEC)
  real, fake = tdisc(x.detach()), tdisc(xh.detach())
  d_loss = factor * vq.hinge_d_loss(real, fake)
  disc_tensors = list(tdisc.parameters())
  disc_grads = dict(zip(disc_tensors, torch.autograd.grad(d_loss, disc_tensors,
                                                          allow_unused=True)))
  d_grads, stats = _as_our_discriminator(tdisc, disc_grads)
  scalar = lambda t: float(t.detach())  # noqa: E731
  return dict(nll=scalar(nll), g=scalar(g), d_weight=scalar(d_weight), factor=factor,
              loss=scalar(loss), d_loss=scalar(d_loss), dec_grads=dec_grads, d_grads=d_grads,
              stats=stats)


def _max_rel(a, b):
  """Max over leaves of max |a - b| / max |b|, the scale floored at 1e-3 of the largest leaf's
  (gradients that are zero in exact arithmetic, e.g. of attention k biases, are pure rounding)."""
  a, b = jax.device_get(a), jax.device_get(b)
  top = max(float(np.max(np.abs(v))) for v in jax.tree.leaves(b))
  errs = jax.tree.map(lambda u, v: float(np.max(np.abs(u - v)) / max(float(np.max(np.abs(v))),
                                                                      1e-3 * top)), a, b)
  return max(jax.tree.leaves(errs))


def test_step_matches_the_official_loss_in_torch(taming_losses, lpips_package):
  """Against the official iteration in torch (SGD with lr 1 exposes the gradients in the updated
  params): at step 3 >= disc_start 2 the GAN terms and the adaptive weight enter; at step 1 they
  do not (the discriminator's step is then a zero update)."""
  torch.manual_seed(0)
  lpips_net = lpips_package.LPIPS(pretrained=False, net="vgg", pnet_rand=True, verbose=False)
  lpips_net = lpips_net.eval()
  with torch.no_grad():
    for k in range(5):  # positive heads, as trained ones are
      getattr(lpips_net, f"lin{k}").model[1].weight.uniform_(0.0, 0.2)
  images, dec, disc_vars, frozen = _step_inputs(lpips_net)
  tx = optax.sgd(1.0)
  step = jax.jit(decoder_step.make_train_step(ENC, DEC, DISC, tx, tx, _loss_cfg(2, 1.0),
                                              _train_cfg()))
  base = decoder_step.create_state(dec, disc_vars, tx, tx)
  for step0 in (3, 1):
    ref = _official_step_in_torch(taming_losses, lpips_net, images, dec, disc_vars, frozen,
                                  step0, 2, 1.0)
    new, m = step(base.replace(step=jnp.asarray(step0)), {"image": images},
                  jax.random.PRNGKey(0), frozen)
    m = jax.device_get(m)
    got_grads = jax.tree.map(lambda p, q: p - q, dec, jax.device_get(new.params))
    err = _max_rel(got_grads, ref["dec_grads"])
    print(f"step {step0}: nll {m['nll']:.3f} / {ref['nll']:.3f}, g {m['g_loss']:.4f} / "
          f"{ref['g']:.4f}, d_weight {m['d_weight']:.4f} / {ref['d_weight']:.4f}; "
          f"max rel decoder grad err {err:.2e}")
    assert float(m["disc_factor"]) == ref["factor"] == (1.0 if step0 >= 2 else 0.0)
    np.testing.assert_allclose(m["nll"], ref["nll"], rtol=1e-5)
    np.testing.assert_allclose(m["loss"], ref["loss"], rtol=1e-5)
    assert err < 1e-4
    got_d = jax.tree.map(lambda p, q: p - q, disc_vars["params"], jax.device_get(new.disc_params))
    if ref["factor"]:
      assert ref["d_weight"] > 0 and ref["g"] != 0
      np.testing.assert_allclose(m["g_loss"], ref["g"], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(m["d_weight"], ref["d_weight"], rtol=1e-4)
      np.testing.assert_allclose(m["d_loss"], ref["d_loss"], rtol=1e-5)
      d_err = _max_rel(got_d, ref["d_grads"])
      print(f"  max rel discriminator grad err {d_err:.2e}")
      assert d_err < 1e-4
      # The running averages after the generator pass, then the real and the fake pass.
      assert _max_rel(new.disc_stats, ref["stats"]) < 1e-5
    else:  # before disc_start our step skips the discriminator (see decoder_step)
      assert float(m["d_loss"]) == ref["d_loss"] == 0 and float(m["g_loss"]) == 0
      jax.tree.map(np.testing.assert_array_equal, got_d,
                   jax.tree.map(np.zeros_like, disc_vars["params"]))


def test_adaptive_weight_and_hinge_are_taming_s(taming_losses):
  rng = np.random.default_rng(2)
  for scale in (1.0, 0.0):  # 0: the clamp at 1e4
    nll_w, g_w = rng.normal(size=(3, 4)), scale * rng.normal(size=(3, 4))
    w = torch.tensor(np.zeros((3, 4)), requires_grad=True)  # d/dw (a . w) = a
    want = taming_losses.VQLPIPSWithDiscriminator.calculate_adaptive_weight(
        types.SimpleNamespace(discriminator_weight=DISC_WEIGHT), (torch.tensor(nll_w) * w).sum(),
        (torch.tensor(g_w) * w).sum(), last_layer=w)
    got = decoder_step.adaptive_weight(nll_w.astype(np.float32), g_w.astype(np.float32),
                                       DISC_WEIGHT)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
  real, fake = rng.normal(size=(2, 1, 3, 3)), rng.normal(size=(2, 1, 3, 3))
  want = taming_losses.hinge_d_loss(torch.tensor(real), torch.tensor(fake))
  assert float(decoder_step.hinge_d_loss(real, fake)) == pytest.approx(float(want), rel=1e-6)


# ----------------------------------------------------------------------------- image pipeline


@pytest.mark.parametrize("shape, size", [((375, 500), 256), ((500, 333), 256), ((40, 30), 16),
                                         ((200, 200), 256), ((57, 91), 64), ((256, 300), 256)])
def test_the_resize_is_albumentations_smallest_max_size(shape, size):
  """The official ImageNet loader's resize (taming's ImagePaths: albumentations' SmallestMaxSize,
  cv2 bilinear): the same output size, every pixel within 1 level and most equal. cv2 rounds its
  fixed-point sums down where we round to nearest (about 1 value in 8 one level lower); an
  antialiased or corner-aligned resize would differ by far more."""
  import albumentations
  from svg_jax.data import image_pipeline
  image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
  want = albumentations.SmallestMaxSize(max_size=size)(image=image)["image"]
  got = image_pipeline.shorter_side_to(image, size)
  assert got.shape == want.shape and got.dtype == np.uint8
  diff = got.astype(int) - want
  assert np.abs(diff).max() <= 1 and (diff == 0).mean() > 0.85, (diff.min(), diff.max())


def test_crops_are_albumentations_random_and_center_crops():
  """RandomCrop's offsets from two uniform draws (albumentations' own get_crop_coords), and
  CenterCrop's square."""
  import albumentations
  from albumentations.augmentations.crops import functional as crops
  from svg_jax.data import image_pipeline

  class Draws:  # an rng whose two draws the test chooses
    def __init__(self, u, v):
      self.values = np.array([u, v])

    def random(self, n):
      assert n == 2
      return self.values

  for h, w, size in ((256, 385, 256), (300, 256, 256), (64, 64, 64), (17, 40, 16)):
    for u, v in ((0.0, 0.0), (0.999999, 0.5), (0.3, 0.999999), (0.5, 0.25)):
      x0, y0, _, _ = crops.get_crop_coords((h, w), (size, size), u, v)
      assert image_pipeline.crop_offsets(h, w, size, Draws(u, v)) == (y0, x0)
    image = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    top, left = image_pipeline.crop_offsets(h, w, size, None)
    np.testing.assert_array_equal(
        image[top:top + size, left:left + size],
        albumentations.CenterCrop(height=size, width=size)(image=image)["image"])


def test_image_pipeline_is_deterministic_resumable_and_skips_bad_images(tmp_path):
  from PIL import Image
  from svg_jax.data import image_pipeline
  rng = np.random.default_rng(0)
  lines = []
  for i in range(6):
    arr = rng.integers(0, 256, (40 + 8 * i, 30 + 4 * i, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / f"{i}.png")
    lines.append({"path": f"{i}.png", "prompt": "x"})
  (tmp_path / "bad.png").write_bytes(b"not an image")
  lines.insert(2, {"path": "bad.png"})
  (tmp_path / "list.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  cfg = image_pipeline.ImagePipelineConfig(per_process_batch_size=2, resolution=16, seed=3)
  it = image_pipeline.make_image_pipeline(tmp_path / "list.jsonl", cfg, process_index=0,
                                          process_count=1)
  batches = [next(it)["image"] for _ in range(4)]
  state = it.get_state()
  after = [next(it)["image"] for _ in range(3)]
  assert all(b.shape == (2, 16, 16, 3) and b.dtype == np.uint8 for b in batches)
  # Every image is a 16 x 16 square of one listed good image with its shorter side at 16, at
  # offsets that vary (the images are taller than wide).
  resized = [image_pipeline.shorter_side_to(np.asarray(Image.open(tmp_path / f"{i}.png")), 16)
             for i in range(6)]
  found = set()
  for img in np.concatenate(batches + after):
    found |= {(i, top) for i, r in enumerate(resized) for top in range(r.shape[0] - 15)
              if np.array_equal(img, r[top:top + 16])}
  assert len({i for i, _ in found}) > 1 and len({top for _, top in found}) > 1, found
  assert all(any(np.array_equal(img, r[top:top + 16]) for r in resized
                 for top in range(r.shape[0] - 15)) for img in np.concatenate(batches + after))
  again = image_pipeline.make_image_pipeline(tmp_path / "list.jsonl", cfg, process_index=0,
                                             process_count=1)
  assert all(np.array_equal(next(again)["image"], b) for b in batches)  # same seed, same order
  again.set_state(state)
  assert all(np.array_equal(next(again)["image"], b) for b in after)  # resumes exactly
  with pytest.raises(ValueError, match="has no \"path\""):
    (tmp_path / "nopath.jsonl").write_text('{"prompt": "x"}\n')
    image_pipeline.read_image_list(tmp_path / "nopath.jsonl")
  # Two bad images in a row: replaced under the default, the stop at max_bad_in_a_row = 2.
  (tmp_path / "bad2.png").write_bytes(b"")
  lines.insert(3, {"path": "bad2.png"})
  (tmp_path / "two.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
  whole_epoch = -(-len(lines) // 2)
  it = image_pipeline.make_image_pipeline(tmp_path / "two.jsonl", cfg, process_index=0,
                                          process_count=1)
  assert all(next(it)["image"].shape == (2, 16, 16, 3) for _ in range(whole_epoch))
  strict = dataclasses.replace(cfg, max_bad_in_a_row=2)
  it = image_pipeline.make_image_pipeline(tmp_path / "two.jsonl", strict, process_index=0,
                                          process_count=1)
  with pytest.raises(image_pipeline.BadImagesInARow,
                     match=r"2 images in a row of .*two.jsonl cannot be used \(data.max_bad_in_a_"
                     r"row = 2; .*\), from image 3 of 8: .*/bad.png \(not a recognized image"):
    for _ in range(whole_epoch):
      next(it)


def test_image_pipeline_resumes_on_another_number_of_processes(tmp_path):
  """States saved by P processes resume on P' (through set_state_of_processes, as the
  checkpoint's loader handler calls it): the next global batch is the uninterrupted run's, as a
  set of images (the order inside a global batch depends on the process count)."""
  from PIL import Image
  from svg_jax.data import image_pipeline
  rng = np.random.default_rng(1)
  lines = []
  for i in range(11):  # distinct images, an odd count so epochs straddle batches
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    lines.append(json.dumps({"path": f"{i}.png"}) + "\n")
  (tmp_path / "list.jsonl").write_text("".join(lines))
  global_batch = 4

  def loaders(count):
    cfg = image_pipeline.ImagePipelineConfig(per_process_batch_size=global_batch // count,
                                             resolution=16, seed=5)
    return [image_pipeline.make_image_pipeline(tmp_path / "list.jsonl", cfg, process_index=p,
                                               process_count=count) for p in range(count)]

  def global_batches(its, n):
    return [sorted(img.tobytes() for it in its for img in next(it)["image"]) for _ in range(n)]

  reference = global_batches(loaders(1), 7)
  for saved, resumed in ((2, 1), (1, 4), (4, 2)):
    before = loaders(saved)
    assert global_batches(before, 3) == reference[:3]
    states = [it.get_state() for it in before]
    after = loaders(resumed)
    for p, it in enumerate(after):
      it.set_state_of_processes(states, p)
    assert global_batches(after, 4) == reference[3:], (saved, resumed)
  with pytest.raises(ValueError, match="disagree on the position"):
    loaders(1)[0].set_state_of_processes([{"next_index": 1}, {"next_index": 2}], 0)


def _image_list(folder, names_and_shapes, name="list.jsonl"):
  """PNGs of the given (height, width) (None: a file that is no image) and their jsonl."""
  from PIL import Image
  rng = np.random.default_rng(7)
  lines = []
  for entry, shape in names_and_shapes:
    if shape is None:
      (folder / entry).write_bytes(b"not an image")
    elif not (folder / entry).exists():
      Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(folder / entry)
    lines.append(json.dumps({"path": entry}) + "\n")
  (folder / name).write_text("".join(lines))
  return folder / name


@pytest.mark.parametrize("num_workers", [0, 1])
def test_bad_images_in_a_row_are_one_input_error_also_from_worker_processes(tmp_path,
                                                                          num_workers):
  """The stop at data.max_bad_in_a_row is an InputError (the loop reports it in one line, exit
  2) naming the images and why, also when a Grain worker process raised it: Grain re-raises the
  worker's exception, type and message, in the reading process."""
  from svg_jax.data import image_pipeline
  from svg_jax.input_errors import InputError
  jsonl = _image_list(tmp_path, [(f"bad{i}.png", None) for i in range(5)] + [("ok.png", (20, 20))])
  cfg = image_pipeline.ImagePipelineConfig(per_process_batch_size=2, resolution=16, seed=0,
                                           max_bad_in_a_row=3, num_workers=num_workers)
  it = image_pipeline.make_image_pipeline(jsonl, cfg, process_index=0, process_count=1)
  try:
    with pytest.raises(InputError) as info:
      for _ in range(3):
        next(it)
  finally:
    it.close()
  assert isinstance(info.value, image_pipeline.BadImagesInARow), type(info.value)
  msg = str(info.value)
  assert "\n" not in msg and "data.max_bad_in_a_row = 3" in msg, msg
  assert "3 images in a row of " + str(jsonl) in msg, msg
  assert "bad0.png (not a recognized image format" in msg or "bad1.png (not a recognized" in msg
  # Fewer images than the limit, all bad: "none of them", with the count of those not named.
  jsonl = _image_list(tmp_path, [(f"bad{i}.png", None) for i in range(5)], "allbad.jsonl")
  it = image_pipeline.make_image_pipeline(jsonl, dataclasses.replace(cfg, max_bad_in_a_row=64),
                                          process_index=0, process_count=1)
  try:
    with pytest.raises(image_pipeline.BadImagesInARow) as info:
      next(it)
  finally:
    it.close()
  # str(): what the one line shows (pytest's `match` would also see the note Grain adds).
  assert re.fullmatch(r"none of the 5 images of .*allbad.jsonl can be used: .*bad\d.png \(not a "
                      r"recognized image format .*; and 2 more", str(info.value)), str(info.value)


def test_bad_and_tiny_training_images_are_counted_logged_once_and_resumed(tmp_path, caplog):
  """A bad or too small image (shorter side below min(min_side, resolution)) is replaced by the
  next image of the list, counted each time (`stats`, the names of the DiT loader's, kept in
  the state) and logged once per process with its path named once, not again every epoch."""
  from svg_jax.data import image_pipeline
  jsonl = _image_list(tmp_path, [("a.png", (20, 24)), ("broken.png", None), ("dot.png", (1, 1)),
                                 ("b.png", (16, 30)), ("strip.png", (1, 40)), ("c.png", (24, 18)),
                                 ("d.png", (30, 30)), ("e.png", (17, 16))])
  # min_side 64 > resolution 16: a 16 px side is enough (never more than the training square).
  cfg = image_pipeline.ImagePipelineConfig(per_process_batch_size=4, resolution=16, seed=1,
                                           min_side=64)
  it = image_pipeline.make_image_pipeline(jsonl, cfg, process_index=0, process_count=1)
  caplog.set_level("ERROR", logger=image_pipeline.__name__)
  batches = [next(it)["image"] for _ in range(6)]  # 3 epochs of 8
  # Per epoch: broken.png's position tries broken, dot (2), dot's tries dot (1), strip's (1).
  stats = it.stats
  assert (stats["batches"], stats["examples"], stats["bad_records"]) == (6, 24, 12), stats
  assert sorted(r.rsplit("/", 1)[1] for r in stats["bad_record_reports"]) == [
          "broken.png: not a recognized image format (corrupt data?)",
          "dot.png: too small: 1x1, shorter side < 16",
          "strip.png: too small: 40x1, shorter side < 16"], stats["bad_record_reports"]
  logged = [r.getMessage() for r in caplog.records]
  for name in ("broken.png", "dot.png", "strip.png"):
    lines = [m for m in logged if name in m]
    assert len(lines) == 1 and lines[0].count(name) == 1, lines
  assert all(b.shape == (4, 16, 16, 3) for b in batches)
  # The counters are part of the state: a resume counts on from them.
  it = image_pipeline.make_image_pipeline(jsonl, cfg, process_index=0, process_count=1)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as the checkpoint stores it
  again = image_pipeline.make_image_pipeline(jsonl, cfg, process_index=0, process_count=1)
  again.set_state(state)
  assert all(np.array_equal(next(again)["image"], b) for b in batches[3:])
  assert again.stats["bad_records"] == 12 and again.stats["batches"] == 6


def test_a_resume_under_another_list_batch_or_seed_is_refused_naming_the_fields(tmp_path,
                                                                                caplog):
  """The loader state says what its position means (the list's fingerprint, global batch, seed):
  another of them is a LoaderStateMismatch (an InputError; the checkpoint handler makes it the
  loop's one-line resume error) naming each field; a state of the first format, {"next_index"}
  alone, resumes at its position with a warning."""
  from svg_jax.data import image_pipeline
  from svg_jax.input_errors import InputError
  shapes = [(f"{i}.png", (16, 16)) for i in range(10)]
  jsonl = _image_list(tmp_path, shapes)
  cfg = image_pipeline.ImagePipelineConfig(per_process_batch_size=2, resolution=16, seed=4)

  def loader(config=cfg, path=jsonl, index=0, count=1):
    return image_pipeline.make_image_pipeline(path, config, process_index=index,
                                              process_count=count)

  reference = loader()
  batches = [next(reference)["image"] for _ in range(5)]
  it = loader()
  for _ in range(3):
    next(it)
  state = it.get_state()
  assert state["signature"]["global_batch_size"] == 2 and state["signature"]["seed"] == 4
  # The same list moved elsewhere (its paths as written are the same): accepted.
  moved = tmp_path / "moved"
  moved.mkdir()
  for name, _ in shapes:
    (moved / name).write_bytes((tmp_path / name).read_bytes())
  same = loader(path=_image_list(moved, shapes))
  same.set_state(state)
  assert all(np.array_equal(next(same)["image"], b) for b in batches[3:])
  other_list = _image_list(tmp_path, shapes[:9] + [("0.png", (16, 16))], "other.jsonl")
  for it, fields in ((loader(dataclasses.replace(cfg, seed=5)), ["data.shuffle_seed (saved 4, "
                                                                  "now 5)"]),
                     (loader(dataclasses.replace(cfg, per_process_batch_size=4)),
                      ["train.global_batch_size (saved 2, now 4)"]),
                     (loader(path=other_list), ["the image list (data.jsonl's paths, in order)"]),
                     (loader(path=_image_list(tmp_path, shapes[:9], "short.jsonl"),
                             config=dataclasses.replace(cfg, seed=0)),
                      ["the image list", "the number of images (data.jsonl) (saved 10, now 9)",
                       "data.shuffle_seed (saved 4, now 0)"])):
    with pytest.raises(image_pipeline.LoaderStateMismatch) as info:
      it.set_state(state)
    assert isinstance(info.value, InputError) and "\n" not in str(info.value)
    for field in fields:
      assert field in str(info.value), (field, str(info.value))
  # Resuming on 2 processes checks the same fields.
  with pytest.raises(image_pipeline.LoaderStateMismatch, match=r"train.global_batch_size \(saved "
                     r"2, now 4\)"):
    loader(index=1, count=2).set_state_of_processes([state], 1)
  # An old state: accepted at its position, with a warning.
  caplog.set_level("WARNING", logger=image_pipeline.__name__)
  old = loader()
  old.set_state({"next_index": 3})
  assert all(np.array_equal(next(old)["image"], b) for b in batches[3:])
  assert any("predates the check" in r.getMessage() for r in caplog.records)


def test_held_out_images_that_cannot_be_used_stop_the_start_in_one_line(tmp_path):
  """The evaluation set is fixed: a bad or too small held-out image is refused before training
  (BadHeldOutImage, an InputError naming each image and why), not skipped or replaced."""
  from svg_jax.data import image_pipeline
  jsonl = _image_list(tmp_path, [("a.png", (20, 24)), ("broken.png", None), ("dot.png", (1, 1)),
                                 ("b.png", (16, 30)), ("late.png", None)])
  with pytest.raises(image_pipeline.BadHeldOutImage) as info:
    image_pipeline.load_eval_images(jsonl, 16, 4)
  msg = str(info.value)
  assert "\n" not in msg and msg.startswith("2 of the first 4 held-out images of "), msg
  assert "broken.png (not a recognized image format" in msg and "dot.png (too small: 1x1" in msg
  assert "late.png" not in msg  # not among the images evaluated
  assert image_pipeline.load_eval_images(jsonl, 16, 1).shape == (1, 16, 16, 3)


def test_decoder_config_and_statistics_problems_are_one_line(tmp_path):
  """A folder given as an image list is named a folder; data.min_side is checked; statistics of
  another channel count than the encoder's are an InputError naming autoencoder.stats_path."""
  from svg_jax import latent_stats
  from svg_jax.input_errors import InputError
  config = _tiny_config()
  config.data.jsonl = str(tmp_path)
  config.data.heldout_jsonl = str(tmp_path / "nope.jsonl")
  config.data.min_side = 0
  problems = decoder_task.config_problems(config, 1)
  assert (f"data.jsonl {str(tmp_path)!r} is a folder, not a jsonl file (one {{\"path\": ...}} "
          "line per image)") in problems, problems
  assert f"data.heldout_jsonl {str(tmp_path / 'nope.jsonl')!r} does not exist" in problems
  assert "data.min_side must be >= 1, got 0" in problems
  stats = tmp_path / "stats.pt"
  latent_stats.save_latent_stats(stats, np.zeros(24, np.float32), np.ones(24, np.float32))
  config.autoencoder.stats_path = str(stats)
  config.autoencoder.stats_layer = -1
  fake_setup = types.SimpleNamespace(encoder_cfg=DINOv3Config.from_dict(
      config.autoencoder.encoder.to_dict()))
  with pytest.raises(InputError, match=r"^autoencoder.stats_path .*stats.pt holds statistics of "
                     r"24 channels, but the encoder has 32 \(autoencoder.encoder.dim\)"):
    decoder_task.DecoderSetup._load_frozen(fake_setup, config)


# ----------------------------------------------------------------------------- the loop


TINY = {"autoencoder.encoder": dict(dim=32, depth=2, num_heads=2, ffn_hidden=64,
                                    num_register_tokens=1, scan_layers=False),
        "autoencoder.decoder": dict(z_channels=32, ch=8, ch_mult=(1, 1, 1, 2),
                                    num_res_blocks=0, norm_groups=4),
        "discriminator": dict(ndf=8, n_layers=2),
        "data": dict(resolution=32, num_eval_images=8),
        "train": dict(global_batch_size=8, eval_batch_size=8, log_every=1, lr=2e-3)}


def _tiny_config():
  config = decoder_configs.get_config("tiny")
  for section, values in TINY.items():
    config[section].update(values)
  return config


def _prepare(config, folder):
  """The demo's files for this config's encoder, made the way the demo makes them; the trainer
  then reads them through plain config paths, like any user's."""
  return decoder_data.prepare_for(config, str(folder), num_train=48, num_heldout=8, seed=0)


def _flags(paths, **train):
  out = [f"--config.{key}={value}" for key, value in paths.items()]
  for section, values in TINY.items():
    for k, v in {**values, **(train if section == "train" else {})}.items():
      v = "(" + ",".join(map(str, v)) + ")" if isinstance(v, tuple) else v
      out.append(f"--config.{section}.{k}={v}")
  return out


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _run(workdir, paths, **train):
  env = dict(os.environ, XLA_FLAGS=script_runs.xla_flags(2),
             JAX_PLATFORMS="cpu")
  return subprocess.run(_command(workdir, paths, **train), env=env, capture_output=True,
                        text=True, timeout=400)


def _command(workdir, paths, **train):
  return [sys.executable, os.path.join(REPO, "launch", "train.py"), "--config",
          os.path.join(REPO, "configs", "decoder.py") + ":tiny", "--workdir", str(workdir),
          *_flags(paths, **train)]


def _run_two_processes(workdir, paths, **train):
  """launch/train.py as 2 local processes of 1 CPU device each under JAX's distributed runtime:
  (exit codes, logs)."""
  port = local_hosts.free_port()
  env = dict(os.environ, XLA_FLAGS=script_runs.xla_flags(1), JAX_PLATFORMS="cpu")
  procs = [local_hosts.popen(_command(workdir, paths, **train),
                             local_hosts.host_env(env, port, 2, i)) for i in range(2)]
  return local_hosts.wait(procs, 400)


@pytest.mark.slow
@pytest.mark.serial
def test_launch_trains_evaluates_and_resumes(tmp_path):
  """launch/train.py with the tiny config on the demo (a 2-device mesh): the loss falls and the
  held-out PSNR is logged; then 2 processes of 1 device each (two hosts) resume from its
  checkpoint and train and evaluate to the end."""
  paths, work = _prepare(_tiny_config(), tmp_path / "demo"), tmp_path / "run"
  with open(paths["data.jsonl"], "a") as f:  # two bad images: replaced, counted in every row
    f.write(json.dumps({"path": "missing.png"}) + "\n" + json.dumps({"path": "empty.png"}) + "\n")
  with open(os.path.join(os.path.dirname(paths["data.jsonl"]), "empty.png"), "wb"):
    pass
  common = dict(checkpoint_every=20, eval_every=20)
  out = _run(work, paths, num_steps=40, **common)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stderr.count("no LPIPS weights configured") == 1
  assert re.search(r"step 40/40 .*\| \d+ bad records replaced", out.stderr), out.stderr[-3000:]
  recs = _records(work)
  losses = {r["step"]: r["loss"] for r in recs if "loss" in r}
  assert sorted(losses) == list(range(1, 41))
  first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s] for s in
                                                                     range(36, 41)])
  evals = [r for r in recs if r.get("event") == "eval"]
  print(f"loss first 5 {first:.1f}, last 5 {last:.1f}; PSNR {[e['heldout_psnr'] for e in evals]}")
  assert last < 0.7 * first
  assert [e["step"] for e in evals] == [20, 40] and evals[1]["heldout_psnr"] > 10
  assert {"d_loss", "d_weight", "l1", "nll"} <= set([r for r in recs if "loss" in r][-1])
  codes, logs = _run_two_processes(work, paths, num_steps=46, **common)
  assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  for log in logs:
    assert "resumed from" in log and "over 2 devices" in log, log[-3000:]
  recs = _records(work)
  assert [r["step"] for r in recs if r.get("event") == "resume"] == [40]
  assert max(r["step"] for r in recs if "loss" in r) == 46
  assert [r["step"] for r in recs if r.get("event") == "eval"] == [20, 40, 46]
  # Each row counts the run's bad images, summed over the processes (each reads its own share):
  # the final row holds the total of both processes' saved loader states.
  saved = [json.load(open(work / "checkpoints" / "46" / "data_iter" / f"process_{i}-of-2.json"))
           ["stats"]["bad_records"] for i in range(2)]
  rows = [r for r in recs if "loss" in r]
  assert rows[-1]["step"] == 46 and rows[-1]["bad_records"] == sum(saved) > 0, (saved, rows[-1])
  assert all(a["bad_records"] <= b["bad_records"] for a, b in zip(rows, rows[1:]) if
             b["step"] > a["step"])


def test_an_evaluation_compiled_ahead_lowers_no_program(tmp_path):
  """`compile_eval` (the loop calls it with the first step's compile, which the stall watch does
  not time) compiles the reconstruction of the held-out images (5 of them: a padded chunk of 8),
  so the evaluation after it lowers nothing: jit finds what was compiled ahead."""
  config = _tiny_config()
  config.data.num_eval_images = 5
  _prepare(config, tmp_path / "demo")
  mesh = parallel.make_mesh(dict(config.mesh))
  setup = decoder_task.TASK.make_setup(config, mesh)
  state = setup.init_state(0)
  with lowered_programs() as ahead:
    setup.compile_eval(state)
  assert setup.eval_due(config.train.eval_every, False)
  with lowered_programs() as during:
    result = setup.evaluate(state, config.train.eval_every)
  assert result["heldout_images"] == 5 and np.isfinite(result["heldout_psnr"])
  assert [n for n in ahead if "reconstruct" in n] and not during, (ahead, during)


@pytest.mark.slow
def test_nan_stops_and_bad_config_is_one_line(tmp_path):
  """In-process on the 8-device mesh: a NaN batch on a save step stops the run before its state
  is saved (step 2 stays the only checkpoint); a bad config is one line naming each error."""
  config = _tiny_config()
  _prepare(config, tmp_path / "demo")
  config.train.update(dict(num_steps=6, checkpoint_every=2, debug_nan_step=4,
                           eval_every=100))
  with pytest.raises(loop.TrainingDiverged, match=r"loss is nan at step 4: training stopped "
                     r"without saving this state; the last good checkpoint is step 2"):
    trainer.train(config, str(tmp_path / "run"))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "run"), read_only=True)
  assert ckpt.all_steps() == [2]
  ckpt.close()
  config.loss.lpips_vgg_path = "/nonexistent/vgg16.pth"
  config.autoencoder.decoder.z_channels = 24
  with pytest.raises(loop.ConfigError) as info:
    trainer.validate_config(config)
  msg = str(info.value)
  assert "\n" not in msg and "set both loss.lpips_vgg_path and loss.lpips_lin_path" in msg
  assert "autoencoder.decoder.z_channels 24 != encoder dim 32" in msg
  # Values that used to fail in the first step, or to be ignored.
  config.autoencoder.decoder.z_channels = 32
  config.discriminator.update(dict(ndf=0, n_layers=-1))
  config.data.update(dict(resolution=0, num_threads=0, crop="middle",
                          num_eval_images=-1, max_bad_in_a_row=0))
  config.loss.disc_start = -5
  with pytest.raises(loop.ConfigError) as info:
    trainer.validate_config(config)
  msg = str(info.value)
  for part in ("ndf must be an integer >= 1, got 0", "n_layers must be an integer >= 1, got -1",
               "data.resolution must be >= 1, got 0", "data.max_bad_in_a_row must be >= 1, got 0",
               "data.num_threads and data.prefetch must be >= 1", "data.crop 'middle' is not one",
               "data.num_eval_images must be >= 0", "loss.disc_start must be >= 0, got -5"):
    assert part in msg, (part, msg)
