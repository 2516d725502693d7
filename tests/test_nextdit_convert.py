"""Conversion of NextDiT weights: lossless round trips, the official 2B key set, strict errors,
diffusers loading our export, the CLI."""
import dataclasses
import math
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import Lumina2Transformer2DModel

import nextdit_reference as ref
from svg_jax.convert import dit_io
from svg_jax.convert import nextdit as keymap
from svg_jax.convert import torch_pickle
from svg_jax.models.nextdit import NextDiTConfig

ROOT = Path(__file__).resolve().parents[1]
SMALL = NextDiTConfig(
    patch_size=2, in_channels=16, dim=96, n_layers=3, n_refiner_layers=2, n_heads=6, n_kv_heads=2,
    multiple_of=32, cap_feat_dim=32, axes_dims=(4, 6, 6), scan_layers=True)


def assert_trees_bitwise_equal(a, b):
  fa = keymap.unscanned_flat(a)
  fb = keymap.unscanned_flat(b)
  assert set(fa) == set(fb)
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype and x.shape == y.shape, k
    assert x.tobytes() == y.tobytes(), k


@pytest.mark.parametrize("fmt", dit_io.FORMATS)
@pytest.mark.parametrize("scan", [True, False])
def test_round_trip_is_bitwise_lossless(tmp_path, fmt, scan):
  cfg = dataclasses.replace(SMALL, scan_layers=scan)
  state = ref.random_official_state(cfg, seed=1)
  if fmt == "diffusers":  # diffusers has no (unused) norm_final; importing one gives ones
    state["norm_final.weight"] = np.ones_like(state["norm_final.weight"])
  params = keymap.official_to_params(state, cfg)
  dst = tmp_path / ("model" if fmt == "diffusers" else f"model.{fmt}")
  dit_io.save_dit(params, dst, fmt, cfg)
  again = dit_io.load_dit(dst, fmt, cfg)
  assert_trees_bitwise_equal(params, again)
  if fmt != "flax":  # and the official tensors survive unchanged
    exported = keymap.params_to_official(again, cfg)
    assert all(exported[k].tobytes() == state[k].tobytes() for k in state)


def test_bf16_official_checkpoint_imports_exactly(tmp_path):
  cfg = SMALL
  state = {k: v.astype(ml_dtypes.bfloat16) for k, v in ref.random_official_state(cfg, 2).items()}
  torch.save({k: torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16) for k, v in state.items()},
             tmp_path / "bf16.pth")
  params = dit_io.load_dit(tmp_path / "bf16.pth", "official", cfg)
  back = keymap.params_to_official(params, cfg, dtype=ml_dtypes.bfloat16)
  assert all(back[k].tobytes() == state[k].tobytes() for k in state)
  dit_io.save_dit(params, tmp_path / "again.pth", "official", cfg, dtype=ml_dtypes.bfloat16)
  written = torch.load(tmp_path / "again.pth", weights_only=True)
  assert all(written[k].dtype == torch.bfloat16 for k in written)
  assert_trees_bitwise_equal(params, dit_io.load_dit(tmp_path / "again.pth", "official", cfg))


def test_diffusers_loads_our_export_strictly(tmp_path):
  cfg = SMALL
  state = ref.random_official_state(cfg, seed=4)
  params = keymap.official_to_params(state, cfg)
  dit_io.save_dit(params, tmp_path / "dit", "diffusers", cfg)
  model = Lumina2Transformer2DModel.from_pretrained(tmp_path / "dit")  # strict by default
  theirs = {k: v.numpy() for k, v in model.state_dict().items()}
  expected = keymap.official_to_diffusers(state, cfg)
  assert set(theirs) == set(expected)
  assert all(np.array_equal(theirs[k], expected[k]) for k in theirs)


def test_official_2b_key_set_and_shapes():
  """Reference §1.7: 400 tensors, these shapes, 2,611,246,336 parameters (abstract, nothing allocated)."""
  shapes = keymap.official_shapes(NextDiTConfig())
  assert len(shapes) == 400
  assert sum(math.prod(s) for s in shapes.values()) == 2_611_246_336
  expected = {
      "x_embedder.weight": (2304, 384), "x_embedder.bias": (2304,),
      "t_embedder.mlp.0.weight": (1024, 256), "t_embedder.mlp.0.bias": (1024,),
      "t_embedder.mlp.2.weight": (1024, 1024), "t_embedder.mlp.2.bias": (1024,),
      "cap_embedder.0.weight": (2304,), "cap_embedder.1.weight": (2304, 2304),
      "cap_embedder.1.bias": (2304,), "norm_final.weight": (2304,),
      "final_layer.linear.weight": (384, 2304), "final_layer.linear.bias": (384,),
      "final_layer.adaLN_modulation.1.weight": (2304, 1024),
      "final_layer.adaLN_modulation.1.bias": (2304,),
  }
  block = {
      "attention.qkv.weight": (3840, 2304), "attention.out.weight": (2304, 2304),
      "attention.q_norm.weight": (96,), "attention.k_norm.weight": (96,),
      "feed_forward.w1.weight": (9216, 2304), "feed_forward.w2.weight": (2304, 9216),
      "feed_forward.w3.weight": (9216, 2304), "attention_norm1.weight": (2304,),
      "ffn_norm1.weight": (2304,), "attention_norm2.weight": (2304,), "ffn_norm2.weight": (2304,),
  }
  adaln = {"adaLN_modulation.1.weight": (9216, 1024), "adaLN_modulation.1.bias": (9216,)}
  for prefix, n, modulated in [("noise_refiner", 2, True), ("context_refiner", 2, False),
                               ("layers", 26, True)]:
    for i in range(n):
      for k, s in (block | (adaln if modulated else {})).items():
        expected[f"{prefix}.{i}.{k}"] = s
  assert shapes == expected
  per_block = sum(math.prod(s) for s in (block | adaln).values())
  assert per_block == 87_312_576
  assert sum(math.prod(s) for s in block.values()) == 77_866_176
  # Export order is the official registration order: x_embedder first, final_layer last.
  order = [k for k, _, _ in keymap._official_order(NextDiTConfig())]
  assert order[:3] == ["x_embedder.weight", "x_embedder.bias", "noise_refiner.0.attention.qkv.weight"]
  assert order[-1] == "final_layer.adaLN_modulation.1.bias" and len(order) == 400


def test_key_errors_list_every_problem():
  cfg = SMALL
  state = ref.random_official_state(cfg)
  broken = dict(state)
  del broken["layers.1.feed_forward.w2.weight"]
  broken["layers.1.extra.weight"] = np.zeros(3, np.float32)
  broken["x_embedder.bias"] = np.zeros(5, np.float32)
  with pytest.raises(keymap.KeyMismatchError) as err:
    keymap.official_to_params(broken, cfg)
  msg = str(err.value)
  assert "layers.1.feed_forward.w2.weight" in msg and "layers.1.extra.weight" in msg
  assert "x_embedder.bias (5,)" in msg
  diffusers = keymap.official_to_diffusers(state, cfg)
  diffusers["transformer_blocks.0.bogus"] = np.zeros(1, np.float32)
  with pytest.raises(keymap.KeyMismatchError, match="transformer_blocks.0.bogus"):
    keymap.diffusers_to_official(diffusers, cfg)


def test_flax_checkpoint_for_another_config_is_refused(tmp_path):
  params = keymap.official_to_params(ref.random_official_state(SMALL), SMALL)
  dit_io.save_dit(params, tmp_path / "p.msgpack", "flax", SMALL)
  other = dataclasses.replace(SMALL, n_layers=2)
  with pytest.raises(keymap.KeyMismatchError, match="unexpected keys: layers_2"):
    dit_io.load_dit(tmp_path / "p.msgpack", "flax", other)


def test_diffusers_config_mismatch_is_refused(tmp_path):
  params = keymap.official_to_params(ref.random_official_state(SMALL), SMALL)
  dit_io.save_dit(params, tmp_path / "dit", "diffusers", SMALL)
  with pytest.raises(ValueError, match="hidden_size"):
    dit_io.load_dit(tmp_path / "dit", "diffusers", dataclasses.replace(SMALL, dim=48, n_heads=3,
                                                                      n_kv_heads=1))


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_malicious_official_checkpoint_is_refused_and_nothing_runs(tmp_path):
  marker = tmp_path / "PWNED"
  path = tmp_path / "consolidated.00-of-01.pth"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps({"x_embedder.weight": _Exploit(marker)}, protocol=2))
    zf.writestr("archive/version", "3\n")
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match="system"):
    dit_io.load_dit(path, "official", SMALL)
  assert not marker.exists()


def test_convert_cli_official_to_diffusers(tmp_path):
  cfg = dataclasses.replace(SMALL, scan_layers=False)
  state = ref.random_official_state(cfg, seed=9)
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "official.pth")
  overrides = [f"--config.model.{k}={v}" for k, v in dict(
      patch_size=2, in_channels=16, dim=96, n_layers=3, n_refiner_layers=2, n_heads=6, n_kv_heads=2,
      multiple_of=32, cap_feat_dim=32, axes_dims="(4,6,6)").items()]
  cmd = [sys.executable, str(ROOT / "launch/convert.py"), "--config", str(ROOT / "configs/tiny.py"),
         *overrides, "--src", str(tmp_path / "official.pth"), "--src-format", "official",
         "--dst", str(tmp_path / "dit"), "--dst-format", "diffusers"]
  subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  model = Lumina2Transformer2DModel.from_pretrained(tmp_path / "dit")
  theirs = model.state_dict()
  for k, v in keymap.official_to_diffusers(state, cfg).items():
    assert np.array_equal(theirs[k].numpy(), v), k
