"""Pixel-decoder weight conversion: svg_jax/convert/decoder_io.py and `launch/convert.py --model
decoder`.

The references are not ours: diffusers' `vae.Decoder` (docs/equivalence/autoencoder.md §2) built
from the config.json we write and loaded strictly from the state dict we write must decode like
our Flax decoder; the official file must be what `DinoDecoder.init_from_ckpt` reads
(`torch.load(path)["state_dict"]`, `decoder.*` keys, docs/reference.md §3.2); Orbax writes the
training workdir. The decoder has 2 levels of 2 ResnetBlocks, the smallest with every block type
(mid attention, lowest-level attention, nin_shortcut, upsample); every weight is random and
non-zero, GroupNorm affines included, so no block is invisible. fp32 on CPU.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import flax
import grain
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers.models.autoencoders.vae import Decoder as TorchDecoder

from svg_jax.convert import decoder as keymap
from svg_jax.convert import decoder_io, safetensors_io, weights_io
from svg_jax.models.decoder import Decoder, DecoderConfig
from svg_jax import checkpoint
from test_decoder import _ldm_to_diffusers, _max_err, _torch_forward

ROOT = Path(__file__).resolve().parents[1]
TINY = DecoderConfig(z_channels=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4)
TINY_FLAGS = [f"--config.autoencoder.decoder.{k}={v}" for k, v in dict(
    z_channels=16, ch=16, ch_mult="(1,2)", num_res_blocks=1, norm_groups=4).items()]
REL_TOL = 1e-5  # max |ours - diffusers| / max |output|, fp32
CLI_TIMEOUT = 300


def _trained_looking(cfg: DecoderConfig, seed: int) -> dict:
  """Random params of every leaf: norm scales ~1, biases ~0, kernels ~ 1.5 / sqrt(fan_in)."""
  boxed = jax.eval_shape(lambda: Decoder(cfg).init(
      jax.random.key(0), jnp.zeros((1, 2, 2, cfg.z_channels)))["params"])
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    name = path[-1].key
    if name == "scale":
      return np.float32(1) + np.float32(0.3) * noise
    if name == "bias":
      return np.float32(0.3) * noise
    return noise * np.float32(1.5 / np.sqrt(np.prod(leaf.shape[:-1])))

  params = jax.tree_util.tree_map_with_path(fill, flax.linen.meta.unbox(boxed))
  assert all(np.all(v != 0) for v in jax.tree.leaves(params))
  return params


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(tree)


def _assert_bitwise_equal(a, b):
  fa, fb = _flat(a), _flat(b)
  assert set(fa) == set(fb)
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype == np.float32 and x.shape == y.shape, k
    assert x.tobytes() == y.tobytes(), k


def _cli(*args):
  cmd = [sys.executable, str(ROOT / "launch/convert.py"), *map(str, args)]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.fixture(scope="module")
def params():
  return _trained_looking(TINY, seed=0)


@pytest.fixture(scope="module")
def workdir(params, tmp_path_factory):
  """A training workdir as the loop writes it: step 3 holds `params`, the later step 5 others."""
  path = tmp_path_factory.mktemp("decoder_run")
  ckpt = checkpoint.Checkpointer(str(path), async_save=False)
  for step, p in ((3, params), (5, _trained_looking(TINY, seed=1))):
    data_iter = iter(grain.MapDataset.range(4).to_iter_dataset())
    ckpt.save(step, {"params": p, "step": np.int32(step)}, data_iter, {"task": "decoder"})
  ckpt.close()
  return path


@pytest.fixture(scope="module")
def decoded(params):
  """A non-square fp32 latent and our decoder's output for it."""
  z = np.random.default_rng(2).standard_normal((2, 3, 5, TINY.z_channels)).astype(np.float32)
  return z, np.asarray(jax.jit(lambda p, z: Decoder(TINY).apply({"params": p}, z))(params, z))


@pytest.mark.parametrize("route", ["api", "cli"])
def test_diffusers_export_decodes_like_ours(route, params, workdir, decoded, tmp_path):
  dst = tmp_path / "decoder"
  if route == "api":
    decoder_io.save_decoder_weights(params, dst, "diffusers", TINY)
  else:  # step 3 of the training run, not its latest
    out = _cli("--model", "decoder", "--config", f"{ROOT}/configs/decoder.py:tiny", *TINY_FLAGS,
               "--src", workdir, "--src_format", "flax", "--step", 3, "--dst", dst,
               "--dst_format", "diffusers")
    assert out.returncode == 0, out.stderr[-3000:]
  config = json.loads((dst / "config.json").read_text())
  model = TorchDecoder(**config).eval()  # config.json is exactly the constructor's kwargs
  state = safetensors.torch.load_file(str(dst / weights_io.DIFFUSERS_WEIGHTS))
  model.load_state_dict(state, strict=True)
  z, ours = decoded
  theirs = _torch_forward(model, z)
  assert theirs.shape == ours.shape == (2, 6, 10, 3)
  scale = float(np.abs(theirs).max())
  rel = _max_err(ours, theirs) / scale
  print(f"{route}: max |ours - diffusers| / max |out| = {rel:.2e} (max |out| {scale:.2f})")
  assert rel <= REL_TOL, f"max |ours - diffusers| / max |out| = {rel:.2e} > {REL_TOL}"


@pytest.mark.parametrize("fmt", decoder_io.FORMATS)
def test_round_trip_is_bitwise(fmt, params, tmp_path):
  dst = tmp_path / ("decoder" if fmt == "diffusers" else f"decoder.{fmt}")
  decoder_io.save_decoder_weights(params, dst, fmt, TINY)
  _assert_bitwise_equal(decoder_io.load_decoder_weights(dst, fmt, TINY), params)


def test_training_workdir_latest_and_chosen_step(params, workdir):
  _assert_bitwise_equal(decoder_io.load_decoder_weights(workdir, "flax", TINY, step=3), params)
  # Default: the latest step; the `checkpoints/` folder itself is accepted too.
  _assert_bitwise_equal(decoder_io.load_decoder_weights(workdir / "checkpoints", "flax", TINY),
                        _trained_looking(TINY, seed=1))
  with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 4 \(steps: \[3, 5\]\)"):
    decoder_io.load_decoder_weights(workdir, "flax", TINY, step=4)
  other = DecoderConfig(z_channels=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4)
  with pytest.raises(keymap.KeyMismatchError, match=r"missing keys: .*up_2_attn_0/k/bias"):
    decoder_io.load_decoder_weights(workdir, "flax", other)


def test_official_file_is_what_the_official_loader_reads(params, tmp_path):
  path = tmp_path / "svg_autoencoder.ckpt"
  decoder_io.save_decoder_weights(params, path, "official", TINY)
  ckpt = torch.load(path, map_location="cpu", weights_only=True)  # DinoDecoder.init_from_ckpt
  assert set(ckpt) == {"state_dict"}
  state = ckpt["state_dict"]
  assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in state.values())
  # diffusers' converter of LDM autoencoder files takes the file whole onto the reference decoder
  diffusers = _ldm_to_diffusers({k: v.numpy() for k, v in state.items()}, TINY)
  TorchDecoder(**keymap.diffusers_config(TINY)).load_state_dict(
      {k: torch.from_numpy(v) for k, v in diffusers.items()}, strict=True)
  exported = keymap.params_to_diffusers(params, TINY)  # checked against diffusers' decoder
  assert all(np.array_equal(diffusers[k], exported[k]) for k in exported)
  assert state["decoder.conv_in.weight"].shape == (32, 16, 3, 3)
  assert state["decoder.up.0.block.0.nin_shortcut.weight"].shape == (16, 32, 1, 1)
  # bf16 output: torch sees bf16 tensors, and they read back as the bf16-rounded params.
  decoder_io.save_decoder_weights(params, tmp_path / "bf16.ckpt", "official", TINY,
                                  dtype=ml_dtypes.bfloat16)
  state = torch.load(tmp_path / "bf16.ckpt", weights_only=True)["state_dict"]
  assert all(v.dtype == torch.bfloat16 for v in state.values())
  rounded = jax.tree.map(lambda v: v.astype(ml_dtypes.bfloat16).astype(np.float32), params)
  _assert_bitwise_equal(decoder_io.load_decoder_weights(tmp_path / "bf16.ckpt", "official", TINY),
                        rounded)


# (format, problem) -> (key to add / drop / reshape in that format's naming, new shape, message)
_PROBLEMS = {
    "extra": {
        "official": ("decoder.up.1.attn.2.q.weight", (32, 32, 1, 1),
                     r"unexpected keys: up\.1\.attn\.2\.q\.weight"),
        "diffusers": ("up_blocks.0.attentions.2.to_q.weight", (32, 32),
                      r"unexpected keys: up_blocks\.0\.attentions\.2\.to_q\.weight"),
        "flax": (("up_1_attn_2", "q", "kernel"), (32, 32),
                 r"unexpected keys: up_1_attn_2/q/kernel"),
    },
    "missing": {
        "official": ("decoder.up.1.attn.1.k.bias", None, r"missing keys: up\.1\.attn\.1\.k\.bias"),
        "diffusers": ("up_blocks.0.attentions.1.to_k.bias", None,
                      r"missing keys: up_blocks\.0\.attentions\.1\.to_k\.bias"),
        "flax": (("up_1_attn_1", "k", "bias"), None, r"missing keys: up_1_attn_1/k/bias"),
    },
    "misshaped": {
        "official": ("decoder.up.0.block.0.nin_shortcut.weight", (16, 32),
                     r"mis-shaped keys: up\.0\.block\.0\.nin_shortcut\.weight \(16, 32\) != "
                     r"\(16, 32, 1, 1\)"),
        "diffusers": ("up_blocks.1.resnets.0.conv_shortcut.weight", (16, 32),
                      r"mis-shaped keys: up_blocks\.1\.resnets\.0\.conv_shortcut\.weight "
                      r"\(16, 32\) != \(16, 32, 1, 1\)"),
        "flax": (("up_0_block_0", "nin_shortcut", "kernel"), (16, 32),
                 r"mis-shaped keys: up_0_block_0/nin_shortcut/kernel \(16, 32\) != \(32, 16\)"),
    },
}


def _mutate(state: dict, key, shape) -> None:
  if shape is None:
    del state[key]
  else:
    state[key] = np.ones(shape, np.float32)


def _write_broken(params, fmt: str, problem: str, path: Path) -> str:
  """A file in `fmt` with one problem, written by that format's own writer; returns the message
  the loader must give."""
  key, shape, message = _PROBLEMS[problem]["official" if fmt == "safetensors" else fmt]
  if fmt == "flax":
    flat = _flat(params)
    _mutate(flat, key, shape)
    path.write_bytes(flax.serialization.msgpack_serialize(flax.traverse_util.unflatten_dict(flat)))
  elif fmt == "diffusers":
    state = keymap.params_to_diffusers(params, TINY)
    _mutate(state, key, shape)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(keymap.diffusers_config(TINY)))
    safetensors.torch.save_file({k: torch.from_numpy(v) for k, v in state.items()},
                                str(path / weights_io.DIFFUSERS_WEIGHTS))
  else:
    state = keymap.params_to_official(params, TINY)
    _mutate(state, key, shape)
    if fmt == "safetensors":
      safetensors.torch.save_file({k: torch.from_numpy(v) for k, v in state.items()}, str(path))
    else:  # a Lightning checkpoint with the other components, which are ignored
      sd = {k: torch.from_numpy(v) for k, v in state.items()}
      sd.update({"encoder.cls_token": torch.zeros(1, 1, 8), "loss.logvar": torch.zeros(())})
      torch.save({"state_dict": sd, "global_step": 7}, path)
  return message


@pytest.mark.parametrize("problem", list(_PROBLEMS))
@pytest.mark.parametrize("fmt", decoder_io.FORMATS)
def test_key_problems_name_the_key(fmt, problem, params, tmp_path):
  path = tmp_path / ("decoder" if fmt == "diffusers" else f"decoder.{fmt}")
  message = _write_broken(params, fmt, problem, path)
  with pytest.raises(keymap.KeyMismatchError, match=message) as info:
    decoder_io.load_decoder_weights(path, fmt, TINY)
  assert "encoder" not in str(info.value) and "loss" not in str(info.value)


def test_diffusers_config_of_another_decoder_is_refused(params, tmp_path):
  decoder_io.save_decoder_weights(params, tmp_path / "decoder", "diffusers", TINY)
  other = DecoderConfig(z_channels=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8)
  with pytest.raises(ValueError, match=r"norm_num_groups=4 \(the decoder config gives 8\)"):
    decoder_io.load_decoder_weights(tmp_path / "decoder", "diffusers", other)


@pytest.mark.parametrize("model", ["decoder", "dit"])
def test_cli_errors_are_one_line(model, params, tmp_path):
  if model == "decoder":
    src = tmp_path / "svg_autoencoder.ckpt"
    _write_broken(params, "official", "extra", src)
    args = ["--config", f"{ROOT}/configs/decoder.py:tiny", *TINY_FLAGS, "--src_format",
            "official"]
    named = ["up.1.attn.2.q.weight"]
  else:
    src = tmp_path / "dit.safetensors"
    safetensors_io.save_safetensors(src, {"x_embedder.weight": np.zeros(3, np.float32),
                                          "bogus.weight": np.zeros(2, np.float32)})
    args = ["--config", f"{ROOT}/configs/tiny.py", "--src_format", "safetensors"]
    named = ["bogus.weight", "x_embedder.weight (3,)", "missing keys: "]
  out = _cli("--model", model, *args, "--src", src, "--dst", tmp_path / "out",
             "--dst_format", "diffusers")
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == 2, out.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("convert error: "), out.stderr[-3000:]
  assert all(n in lines[0] for n in named), lines[0]
  assert not (tmp_path / "out").exists()
