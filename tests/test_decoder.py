"""Pixel decoder: parity with diffusers' `vae.Decoder`, the key maps, and checkpoint loading.

The reference is `diffusers.models.autoencoders.vae.Decoder` built with
`convert.decoder.diffusers_config` (an `AttnUpDecoderBlock2D` at the lowest level,
`mid_block_add_attention=True`), which equals the official SVG-T2I decoder
(docs/equivalence/autoencoder.md §2: <= 2.4e-5 in fp32). Every weight is random, including GroupNorm
affines and biases, so no block is invisible. fp32 on CPU, latents NCHW for torch and NHWC for us,
one square and one non-square latent. The official names are pinned to docs/reference.md §3.2, to
spot checks of docs/equivalence/autoencoder.md §2.2 (official up.{L} <-> diffusers up_blocks.{n-1-L})
and to diffusers' own converter of LDM autoencoder checkpoints.
"""
import argparse
import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import (convert_ldm_vae_checkpoint,
                                                 update_vae_attentions_ldm_to_diffusers)
from diffusers.models.autoencoders.vae import Decoder as TorchDecoder

from svg_jax.convert import decoder as conv
from svg_jax.models.decoder import Decoder, DecoderConfig

# 5 levels (16x upsampling) as released, narrow enough for CPU; channels 32/64/64/64/128.
SMALL = DecoderConfig(z_channels=16, ch=32, ch_mult=(1, 2, 2, 2, 4), num_res_blocks=2,
                      norm_groups=8)
LATENT_SHAPES = [(4, 4), (3, 5)]  # -> 64x64 and 48x80 images
ATOL = 1e-4


def _randomize(module: torch.nn.Module, seed: int) -> None:
  """Random values for every parameter: norms ~1, biases ~0, weights ~ 1.5/sqrt(fan_in)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim == 1 and "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.3 * noise)
      elif p.ndim == 1:
        p.copy_(0.3 * noise)
      else:
        p.copy_(noise * 1.5 / np.sqrt(p[0].numel()))


def _torch_decoder(cfg: DecoderConfig, seed: int = 0, **overrides) -> TorchDecoder:
  model = TorchDecoder(**{**conv.diffusers_config(cfg), **overrides}).eval()
  _randomize(model, seed)
  return model


def _torch_forward(model: TorchDecoder, z_nhwc: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model(torch.from_numpy(z_nhwc).permute(0, 3, 1, 2).contiguous())
  return out.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def reference():
  model = _torch_decoder(SMALL)
  state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
  rng = np.random.default_rng(0)
  latents = [rng.standard_normal((2, h, w, SMALL.z_channels)).astype(np.float32)
             for h, w in LATENT_SHAPES]
  outputs = [_torch_forward(model, z) for z in latents]
  return model, state, latents, outputs


@pytest.fixture(scope="module")
def apply_fn():
  model = Decoder(SMALL)
  return jax.jit(lambda params, z: model.apply({"params": params}, z))


def _ldm_to_diffusers(official: dict, cfg: DecoderConfig) -> dict[str, np.ndarray]:
  """An official decoder state (`decoder.*` keys) as diffusers' loader of LDM autoencoder
  checkpoints converts it, under `vae.Decoder`'s names. LDM autoencoders have no attention in
  their up levels, so that converter passes the lowest level's `up.L.attn.*` keys through
  unrenamed; they go through diffusers' own attention renamer with its level rule (official up.L
  is up_blocks.{n-1-L}, as for the resnets)."""
  state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in official.items()}
  n = cfg.num_levels
  out = convert_ldm_vae_checkpoint(state, {"down_block_types": (),
                                           "up_block_types": ("UpDecoderBlock2D",) * n})
  for level in range(n):
    attn = [k for k in state if k.startswith(f"decoder.up.{level}.attn.")]
    for k in attn:
      assert out.pop(k) is state[k]
    update_vae_attentions_ldm_to_diffusers(
        attn, out, state, {"old": f"up.{level}.attn", "new": f"up_blocks.{n - 1 - level}.attentions"})
  assert all(k.startswith("decoder.") for k in out), sorted(out)
  return {k.removeprefix("decoder."): v.numpy() for k, v in out.items()}


def _max_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_parity_with_diffusers(reference, apply_fn):
  _, state, latents, outputs = reference
  params = conv.diffusers_to_params(state, SMALL)
  for z, want in zip(latents, outputs):
    got = apply_fn(params, z)
    assert got.shape == (2, 16 * z.shape[1], 16 * z.shape[2], 3) == want.shape
    err = _max_err(got, want)
    print(f"latent {z.shape[1]}x{z.shape[2]}: max |jax - diffusers| = {err:.2e}, "
          f"max |out| = {np.abs(want).max():.2f}")
    assert err <= ATOL, err


def test_official_key_map_is_diffusers_ldm_conversion(reference):
  """Our official names against diffusers' converter of LDM autoencoder checkpoints: every
  official tensor lands on the same diffusers tensor both ways (a swap of same-shaped tensors,
  norm1 / norm2 or q / k, fails here), and the result loads strictly into the reference."""
  model, state, _, _ = reference
  params = conv.diffusers_to_params(state, SMALL)
  theirs = _ldm_to_diffusers(conv.params_to_official(params, SMALL), SMALL)
  assert set(theirs) == set(state)
  for k, v in state.items():
    assert theirs[k].tobytes() == v.tobytes(), k
  model.load_state_dict({k: torch.from_numpy(v) for k, v in theirs.items()}, strict=True)


def test_parity_through_the_official_key_map(reference, apply_fn):
  # Official keys (with the Lightning `decoder.` prefix) next to the other components' keys.
  _, state, latents, outputs = reference
  official = conv.params_to_official(conv.diffusers_to_params(state, SMALL), SMALL)
  assert all(k.startswith("decoder.") for k in official)
  ckpt = {**official, "encoder.blocks.0.norm1.weight": np.ones(4, np.float32),
          "loss.logvar": np.zeros((), np.float32)}
  params = conv.official_to_params(ckpt, SMALL)
  err = _max_err(apply_fn(params, latents[1]), outputs[1])
  assert err <= ATOL, err


def test_negative_controls(reference, apply_fn):
  model, state, latents, outputs = reference
  params = conv.diffusers_to_params(state, SMALL)
  z, want = latents[1], outputs[1]
  # (a) The reference without the lowest-level attention (the official strict=False failure mode):
  # the comparison must see the difference.
  no_attn = TorchDecoder(**{**conv.diffusers_config(SMALL),
                            "up_block_types": ("UpDecoderBlock2D",) * SMALL.num_levels}).eval()
  missing, unexpected = no_attn.load_state_dict(model.state_dict(), strict=False)
  assert not missing and unexpected and all(".attentions." in k for k in unexpected)
  err_no_attn = _max_err(apply_fn(params, z), _torch_forward(no_attn, z))
  # (b) Conv kernels with H and W swapped (a wrong OIHW -> HWIO permutation).
  flat = flax.traverse_util.flatten_dict(params)
  swapped = flax.traverse_util.unflatten_dict(
      {k: (v.transpose(1, 0, 2, 3) if v.ndim == 4 else v) for k, v in flat.items()})
  err_swap = _max_err(apply_fn(swapped, z), want)
  print(f"negative controls: no up-level attention {err_no_attn:.2f}, HW-swapped kernels "
        f"{err_swap:.2f} (max |out| {np.abs(want).max():.2f})")
  assert err_no_attn > 0.1 and err_swap > 0.1


def test_official_names_follow_the_reference():
  # Facts from docs/reference.md §3.2 and docs/equivalence/autoencoder.md §2.2 for the released ddconfig.
  cfg = DecoderConfig()
  shapes = {}
  for path, off, dif, kind, shape in conv.key_map(cfg):
    if kind == "conv3":
      shapes[off] = (shape[3], shape[2], 3, 3)
    elif kind in ("shortcut", "attn"):
      shapes[off] = (shape[1], shape[0], 1, 1)
    else:
      shapes[off] = shape
  assert shapes["conv_in.weight"] == (512, 384, 3, 3)
  assert shapes["mid.attn_1.q.weight"] == (512, 512, 1, 1)
  for j in range(3):
    for p in ("q", "k", "v", "proj_out"):
      assert shapes[f"up.4.attn.{j}.{p}.weight"] == (512, 512, 1, 1)
  assert "up.4.attn.3.q.weight" not in shapes and "up.3.attn.0.q.weight" not in shapes
  assert shapes["up.4.upsample.conv.weight"] == (512, 512, 3, 3)
  assert shapes["up.3.block.0.conv1.weight"] == (256, 512, 3, 3)
  assert shapes["up.3.block.0.norm1.weight"] == (512,)
  assert shapes["up.3.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
  assert shapes["up.1.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
  assert sorted(k for k in shapes if "nin_shortcut.weight" in k) == [
      "up.1.block.0.nin_shortcut.weight", "up.3.block.0.nin_shortcut.weight"]
  assert not any(k.startswith("up.0.upsample") for k in shapes)
  assert shapes["norm_out.weight"] == (128,) and shapes["conv_out.weight"] == (3, 128, 3, 3)
  # Official up.{L} is diffusers up_blocks.{n-1-L}; 1x1 convs squeeze to diffusers' Linear.
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                        jax.eval_shape(lambda: Decoder(SMALL).init(
                            jax.random.key(0), jnp.zeros((1, 2, 2, SMALL.z_channels))))["params"])
  off, dif = conv.params_to_official(params, SMALL), conv.params_to_diffusers(params, SMALL)
  same = [("up.4.attn.1.q.weight", "up_blocks.0.attentions.1.to_q.weight"),
          ("mid.attn_1.proj_out.weight", "mid_block.attentions.0.to_out.0.weight"),
          ("up.4.attn.2.norm.bias", "up_blocks.0.attentions.2.group_norm.bias"),
          ("mid.block_2.conv1.weight", "mid_block.resnets.1.conv1.weight"),
          ("up.3.block.0.nin_shortcut.weight", "up_blocks.1.resnets.0.conv_shortcut.weight"),
          ("up.0.block.0.nin_shortcut.bias", "up_blocks.4.resnets.0.conv_shortcut.bias"),
          ("up.2.upsample.conv.weight", "up_blocks.2.upsamplers.0.conv.weight"),
          ("up.0.block.2.conv2.weight", "up_blocks.4.resnets.2.conv2.weight"),
          ("norm_out.weight", "conv_norm_out.weight")]
  for o, d in same:
    a, b = off["decoder." + o], dif[d]
    assert np.array_equal(a.reshape(b.shape), b), (o, d)


def test_parameter_count_of_the_released_config():
  cfg = DecoderConfig()
  shapes = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 2, 2, 384))))
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  with torch.device("meta"):
    ref = TorchDecoder(**conv.diffusers_config(cfg))
  assert ours == 43_039_619 == sum(p.numel() for p in ref.parameters())
  assert len(ref.state_dict()) == len(conv.key_map(cfg))


def test_round_trips_are_bit_exact(reference):
  _, state, _, _ = reference
  back = conv.params_to_diffusers(conv.diffusers_to_params(state, SMALL), SMALL)
  assert set(back) == set(state)
  for k in state:
    assert back[k].dtype == state[k].dtype and np.array_equal(back[k], state[k]), k

  rng = np.random.default_rng(2)
  official = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in
              conv.params_to_official(conv.diffusers_to_params(state, SMALL), SMALL).items()}
  ckpt = {**official, "encoder.cls_token": np.zeros((1, 1, 4), np.float32),
          "loss.discriminator.main.0.weight": np.zeros((2, 3, 4, 4), np.float32)}
  back = conv.params_to_official(conv.official_to_params(ckpt, SMALL), SMALL)
  assert set(back) == set(official)
  for k in official:
    assert back[k].dtype == official[k].dtype and np.array_equal(back[k], official[k]), k
  # Bare official keys (prefix "") round-trip too.
  bare = conv.params_to_official(conv.official_to_params(ckpt, SMALL), SMALL, prefix="")
  assert set(bare) == {k[len("decoder."):] for k in official}


def _official(state):
  return conv.params_to_official(conv.diffusers_to_params(state, SMALL), SMALL)


def test_missing_unexpected_and_misshaped_keys_raise(reference):
  _, state, _, _ = reference
  official = _official(state)
  dropped = {k: v for k, v in official.items() if not k.startswith("decoder.up.4.attn.1.")}
  with pytest.raises(ValueError, match=r"missing keys: .*up\.4\.attn\.1\.k\.bias") as e:
    conv.official_to_params(dropped, SMALL)
  assert "up.4.attn.1.q.weight" in str(e.value) and "up.4.attn.1.proj_out.weight" in str(e.value)

  extra = {**official, "decoder.up.4.attn.3.q.weight": np.zeros((128, 128, 1, 1), np.float32)}
  with pytest.raises(ValueError, match=r"unexpected keys: up\.4\.attn\.3\.q\.weight"):
    conv.official_to_params(extra, SMALL)
  with pytest.raises(ValueError, match=r"unexpected keys: model\.foo"):
    conv.official_to_params({**official, "model.foo": np.zeros(1)}, SMALL)
  bad = {**official, "decoder.conv_in.weight": np.zeros((128, 16, 1, 1), np.float32)}
  with pytest.raises(ValueError, match=r"mis-shaped keys: conv_in\.weight \(128, 16, 1, 1\)"):
    conv.official_to_params(bad, SMALL)
  # The diffusers direction, and a model config that does not fit the checkpoint.
  with pytest.raises(ValueError,
                     match=r"missing keys: .*up_blocks\.0\.attentions\.1\.to_q\.weight"):
    conv.diffusers_to_params({k: v for k, v in state.items()
                              if not k.startswith("up_blocks.0.attentions.1.")}, SMALL)
  with pytest.raises(ValueError, match="mis-shaped"):
    conv.diffusers_to_params(state, dataclasses.replace(SMALL, z_channels=8))
  params = conv.diffusers_to_params(state, SMALL)
  del params["up_4_attn_2"]
  with pytest.raises(ValueError, match=r"missing keys: up_4_attn_2/k/bias"):
    conv.params_to_official(params, SMALL)


def test_load_lightning_ckpt_and_safetensors(reference, tmp_path):
  from safetensors.numpy import save_file

  _, state, _, _ = reference
  want = conv.diffusers_to_params(state, SMALL)
  official = _official(state)
  sd = {k: torch.from_numpy(v) for k, v in official.items()}
  sd["encoder.cls_token"] = torch.zeros(1, 1, 8)
  sd["loss.logvar"] = torch.zeros(())
  ckpt = {"epoch": 3, "global_step": 12, "state_dict": sd,
          "hyper_parameters": argparse.Namespace(base_learning_rate=1e-4, ddconfig={"ch": 32})}
  torch.save(ckpt, tmp_path / "svg.ckpt")
  save_file(state, str(tmp_path / "diffusers.safetensors"))
  bare = {k[len("decoder."):]: v for k, v in official.items()}
  save_file(bare, str(tmp_path / "bare.safetensors"))
  for name in ("svg.ckpt", "diffusers.safetensors", "bare.safetensors"):
    got = conv.load_decoder(tmp_path / name, SMALL)
    jax.tree.map(np.testing.assert_array_equal, got, want)
  del sd["decoder.up.4.attn.0.v.bias"]
  torch.save(ckpt, tmp_path / "broken.ckpt")
  with pytest.raises(ValueError, match=r"missing keys: up\.4\.attn\.0\.v\.bias"):
    conv.load_decoder(str(tmp_path / "broken.ckpt"), SMALL)


def test_bad_latents_raise():
  with pytest.raises(ValueError, match=r"latents \[B, h, w, 16\]"):
    Decoder(SMALL).init(jax.random.key(0), jnp.zeros((1, 16, 2, 2)))
  with pytest.raises(ValueError, match="not divisible by norm_groups"):
    Decoder(dataclasses.replace(SMALL, norm_groups=12)).init(
        jax.random.key(0), jnp.zeros((1, 2, 2, 16)))


def _torch_forward_autocast(model: TorchDecoder, z_nhwc: np.ndarray) -> np.ndarray:
  """diffusers under torch.autocast(bfloat16) as on a GPU: CUDA's autocast runs GroupNorm in fp32,
  CPU's runs it in bf16 on the bf16 conv outputs, so GroupNorm inputs are cast to fp32 here."""
  hooks = [m.register_forward_pre_hook(lambda _, args: tuple(a.float() for a in args))
           for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
  try:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
      out = model(torch.from_numpy(z_nhwc).permute(0, 3, 1, 2).contiguous())
  finally:
    for hook in hooks:
      hook.remove()
  return out.float().permute(0, 2, 3, 1).numpy()


def test_bf16_compute_stays_close_to_the_reference(reference):
  """compute_dtype=bfloat16 errs against diffusers' fp32 decoder no more than diffusers' own forward
  under a bf16 autocast does, and far more than fp32 rounding: bf16 is used.

  This autocast rounds every conv output to bf16, and with it most of the residual stream; we
  round only the conv and matmul inputs. Rounding our residual stream, GroupNorm inputs or
  attention logits to bf16 therefore stays within autocast's error (measured RMS 0.7-1.0x
  autocast's): this test cannot see those.
  """
  model, state, latents, outputs = reference
  params = conv.diffusers_to_params(state, SMALL)
  bf16 = Decoder(dataclasses.replace(SMALL, compute_dtype="bfloat16"))
  got = np.asarray(jax.jit(lambda p, z: bf16.apply({"params": p}, z))(params, latents[1]))
  assert got.dtype == np.float32
  want, autocast = outputs[1], _torch_forward_autocast(model, latents[1])
  errs = {name: (float(np.sqrt(np.mean((out - want) ** 2) / np.mean(want ** 2))),
                 float(np.abs(out - want).max() / np.abs(want).max()))
          for name, out in (("ours", got), ("autocast", autocast))}
  print("bf16 vs diffusers fp32 (relative RMS, max): "
        + ", ".join(f"{k} {r:.3g}, {m:.3g}" for k, (r, m) in errs.items()))
  (ours_rms, ours_max), (ac_rms, ac_max) = errs["ours"], errs["autocast"]
  # Measured ours / autocast over 6 latents: RMS 0.57-0.82 (here 0.64), max 0.54-0.82 (CPU
  # autocast's bf16 GroupNorm: RMS 0.55-0.79). fp32 compute gives 2e-6.
  assert 1e-4 < ours_rms <= ac_rms, errs
  assert ours_max <= 1.5 * ac_max, errs


@pytest.mark.slow
def test_parity_released_config():
  # The released 43M-parameter ddconfig (32 groups, 512-channel attention) at a small latent.
  cfg = DecoderConfig()
  model = _torch_decoder(cfg, seed=3)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  z = np.random.default_rng(3).standard_normal((1, 3, 5, cfg.z_channels)).astype(np.float32)
  want = _torch_forward(model, z)
  got = jax.jit(lambda p, z: Decoder(cfg).apply({"params": p}, z))(
      conv.diffusers_to_params(state, cfg), z)
  err = _max_err(got, want)
  print(f"released config, latent 3x5: max |jax - diffusers| = {err:.2e}, "
        f"max |out| = {np.abs(want).max():.2f}")
  assert err <= ATOL, err
