"""Conversion of NextDiT weights: lossless round trips, the official 2B key set, our key map
against diffusers' converter of official checkpoints, strict errors, diffusers loading our
export, the CLI (also from a training workdir: Orbax writes it, diffusers loads the result
strictly)."""
import dataclasses
import math
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import grain
import jax
import ml_dtypes
import numpy as np
import optax
import pytest
import torch
from diffusers import Lumina2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers

import nextdit_reference as ref
from svg_jax.convert import dit_io
from svg_jax.convert import nextdit as keymap
from svg_jax.convert import torch_pickle
from svg_jax.demo import configs as demo_configs
from svg_jax.models.nextdit import NextDiTConfig
from svg_jax import checkpoint as ckpt_lib
from svg_jax.train import state as state_lib

ROOT = Path(__file__).resolve().parents[1]
SMALL = NextDiTConfig(
    patch_size=2, in_channels=16, dim=96, n_layers=3, n_refiner_layers=2, n_heads=6, n_kv_heads=2,
    multiple_of=32, cap_feat_dim=32, axes_dims=(4, 6, 6), scan_layers=True)
# configs/tiny.py with SMALL's architecture (its layers unscanned, unlike SMALL)
SMALL_FLAGS = [f"--config.model.{k}={v}" for k, v in dict(
    patch_size=2, in_channels=16, dim=96, n_layers=3, n_refiner_layers=2, n_heads=6, n_kv_heads=2,
    multiple_of=32, cap_feat_dim=32, axes_dims="(4,6,6)").items()]
CLI_TIMEOUT = 300


def assert_flat_bitwise_equal(fa: dict, fb: dict):
  """The same names, and under each the same dtype, shape and bytes."""
  assert set(fa) == set(fb)
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype and x.shape == y.shape, k
    assert x.tobytes() == y.tobytes(), k


def assert_trees_bitwise_equal(a, b):
  assert_flat_bitwise_equal(keymap.unscanned_flat(a), keymap.unscanned_flat(b))


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


def _from_pretrained_strictly(folder: Path) -> dict[str, np.ndarray]:
  """diffusers' own loading of a model folder; it only warns of missing or unexpected keys."""
  model, info = Lumina2Transformer2DModel.from_pretrained(folder, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  return {k: v.numpy() for k, v in model.state_dict().items()}


def test_official_to_diffusers_is_diffusers_own_conversion():
  """Our key map against diffusers' converter of official Lumina-Image-2.0 checkpoints: the same
  names and the same tensor under each (a swap of same-shaped tensors, w1 / w3 or two norms,
  fails here)."""
  state = ref.random_official_state(SMALL, seed=3)
  assert_flat_bitwise_equal(keymap.official_to_diffusers(state, SMALL),
                            ref.diffusers_state(state, SMALL))


def test_official_2b_keys_convert_onto_diffusers_2b_model():
  """At the 2B shapes (meta tensors, nothing allocated): diffusers' converter takes our official
  key set, whole, and yields exactly the parameters of the Lumina2Transformer2DModel that our
  diffusers config builds, shape for shape."""
  cfg = NextDiTConfig()
  state = {k: torch.empty(s, device="meta") for k, s in keymap.official_shapes(cfg).items()}
  converted = convert_lumina2_to_diffusers(state)
  assert not state  # every key was taken
  with torch.device("meta"):
    model = Lumina2Transformer2DModel(**{
        k: v for k, v in keymap.diffusers_config(cfg).items() if not k.startswith("_")})
  assert {k: tuple(v.shape) for k, v in converted.items()} == {
      k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_diffusers_loads_our_export_strictly(tmp_path):
  cfg = SMALL
  state = ref.random_official_state(cfg, seed=4)
  params = keymap.official_to_params(state, cfg)
  dit_io.save_dit(params, tmp_path / "dit", "diffusers", cfg)
  assert_flat_bitwise_equal(_from_pretrained_strictly(tmp_path / "dit"),
                            ref.diffusers_state(state, cfg))


def test_official_2b_key_set_and_shapes():
  """docs/reference.md §1.7: 400 tensors, these shapes, 2,611,246,336 parameters (abstract, nothing allocated)."""
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


def _cli(*args):
  cmd = [sys.executable, str(ROOT / "launch/convert.py"), *map(str, args)]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_convert_cli_official_to_diffusers(tmp_path):
  cfg = dataclasses.replace(SMALL, scan_layers=False)
  state = ref.random_official_state(cfg, seed=9)
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "official.pth")
  out = _cli("--config", ROOT / "configs/tiny.py", *SMALL_FLAGS, "--src", tmp_path / "official.pth",
             "--src_format", "official", "--dst", tmp_path / "dit", "--dst_format", "diffusers")
  assert out.returncode == 0, out.stderr[-3000:]
  assert_flat_bitwise_equal(_from_pretrained_strictly(tmp_path / "dit"),
                            ref.diffusers_state(state, cfg))


def _with_file_size_limit(kib: int, command: list[str]) -> list[str]:
  """`command` under a shell's `ulimit -f`: files over `kib` KiB fail to write with EFBIG (a full
  disk as the writers see it: torch and safetensors get the OS's error mid-file; Python ignores
  the SIGXFSZ that comes with it)."""
  return ["bash", "-c", f'ulimit -f {int(kib)} && exec "$@"', "bash", *command]


def test_cli_destination_is_never_lost_or_half_written(tmp_path):
  """An existing --dst stays unless --overwrite; a diffusers folder is replaced whole (a stale
  sharded index there would otherwise win over the new file in diffusers' loading); a write the
  file system refuses is one line with nothing left behind."""
  cfg = dataclasses.replace(SMALL, scan_layers=False)
  state = ref.random_official_state(cfg, seed=4)
  src = tmp_path / "official.pth"
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, src)
  common = ["--config", ROOT / "configs/tiny.py", *SMALL_FLAGS, "--src", src,
            "--src_format", "official"]
  dst = tmp_path / "out.pth"
  dst.write_bytes(b"a user's file")
  out = _cli(*common, "--dst", dst, "--dst_format", "official")
  assert out.returncode == 2 and "exists" in out.stderr and "--overwrite" in out.stderr, out.stderr
  assert dst.read_bytes() == b"a user's file"
  out = _cli(*common, "--dst", dst, "--dst_format", "official", "--overwrite")
  assert out.returncode == 0, out.stderr[-3000:]
  assert_flat_bitwise_equal({k: v.numpy() for k, v in torch.load(dst).items()}, state)

  # An earlier sharded export in the folder: diffusers' own save_pretrained of other weights.
  folder = tmp_path / "dit"
  other = ref.random_official_state(cfg, seed=5)
  model = Lumina2Transformer2DModel(**keymap.diffusers_config(cfg))
  model.load_state_dict({k: torch.from_numpy(v) for k, v in
                         ref.diffusers_state(other, cfg).items()})
  model.save_pretrained(folder, max_shard_size="100KB")
  assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
  out = _cli(*common, "--dst", folder, "--dst_format", "diffusers")
  assert out.returncode == 2 and "exists" in out.stderr, out.stderr[-3000:]
  out = _cli(*common, "--dst", folder, "--dst_format", "diffusers", "--overwrite")
  assert out.returncode == 0, out.stderr[-3000:]
  assert sorted(p.name for p in folder.iterdir()) == ["config.json",
                                                      "diffusion_pytorch_model.safetensors"]
  assert_flat_bitwise_equal(_from_pretrained_strictly(folder), ref.diffusers_state(state, cfg))

  for args, named in (
      (["--dst", folder, "--dst_format", "official"], "is a folder"),
      (["--dst", dst, "--dst_format", "diffusers"], "is a file"),
      (["--dst", tmp_path / "p.msgpack", "--dst_format", "flax", "--dtype", "bfloat16"],
       "flax msgpack files hold fp32")):
    out = _cli(*common, *args)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and named in lines[0], out.stderr[-3000:]

  before = sorted(os.listdir(tmp_path))
  for fmt, name in (("official", "full.pth"), ("safetensors", "full.safetensors"),
                    ("diffusers", "full_dit")):
    cmd = [sys.executable, str(ROOT / "launch/convert.py"), *map(str, common),
           "--dst", str(tmp_path / name), "--dst_format", fmt]
    out = subprocess.run(_with_file_size_limit(64, cmd), capture_output=True, text=True,
                         timeout=CLI_TIMEOUT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, (fmt, out.stderr[-3000:])
    assert f"could not write {tmp_path / name} (a full disk" in lines[0], (fmt, lines[0])
    assert sorted(os.listdir(tmp_path)) == before, fmt  # no half file, no temporary


# ----------------------------------------------------------------------------- training workdir


def _random_params(seed: int) -> dict:
  """SMALL's params (scanned, as the run trains them), every tensor random."""
  return keymap.official_to_params(ref.random_official_state(SMALL, seed=seed), SMALL)


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
  """A DiT training workdir as the loop writes it: steps 3 and 5, each with EMA != params, and the
  run's config: configs/tiny.py with SMALL's model, bf16 compute and scanned layers (hardware and
  layout fields the converting --config may choose otherwise)."""
  path = tmp_path_factory.mktemp("dit_run")
  config = demo_configs.dit()
  config.model.update(dataclasses.asdict(dataclasses.replace(SMALL, compute_dtype="bfloat16")))
  ckpt = ckpt_lib.Checkpointer(str(path), async_save=False)
  saved = {}
  for step, seed in ((3, 10), (5, 20)):
    params, ema = _random_params(seed), _random_params(seed + 1)
    state = state_lib.create_state(jax.tree.map(np.asarray, params), optax.adam(1e-3)).replace(
        ema_params=ema, step=np.int32(step))
    data_iter = iter(grain.MapDataset.range(4).to_iter_dataset())
    ckpt.save(step, state, data_iter, ckpt_lib.config_to_json(config))
    saved[step] = {"params": params, "ema": ema}
  ckpt.close()
  return path, saved


@pytest.mark.parametrize("choice", ["latest_ema", "step3_raw"])
def test_cli_converts_a_training_workdir(choice, dit_run, tmp_path):
  run, saved = dit_run
  if choice == "latest_ema":
    args, want = ["--src", run], saved[5]["ema"]
  else:  # the `checkpoints/` folder is accepted too
    args, want = ["--src", run / "checkpoints", "--step", 3, "--noema"], saved[3]["params"]
  out = _cli("--config", ROOT / "configs/tiny.py", *SMALL_FLAGS, *args, "--src_format", "flax",
             "--dst", tmp_path / "dit", "--dst_format", "diffusers")
  assert out.returncode == 0, out.stderr[-3000:]
  theirs = _from_pretrained_strictly(tmp_path / "dit")
  assert_flat_bitwise_equal(theirs, ref.diffusers_state(keymap.params_to_official(want, SMALL),
                                                        SMALL))
  # ... and not any other tree of the run (EMA vs raw, step 3 vs 5)
  for step, trees in saved.items():
    for which, tree in trees.items():
      if tree is not want:
        assert not np.array_equal(theirs["x_embedder.weight"],
                                  np.asarray(tree["x_embedder"]["kernel"]).T), (step, which)


@pytest.mark.parametrize("problem", ["config", "step", "step_folder", "noema_file",
                                     "decoder_noema", "decoder_model"])
def test_cli_workdir_errors_are_one_line(problem, dit_run, tmp_path):
  run, saved = dit_run
  args = ["--config", ROOT / "configs/tiny.py", *SMALL_FLAGS, "--src", run, "--src_format", "flax"]
  if problem == "config":
    args += ["--config.model.n_layers=2", "--config.model.rope_theta=500.0"]
    named = ["step 5", "n_layers (run 3, config 2)", "rope_theta (run 10000.0, config 500.0)"]
  elif problem == "step":
    args += ["--step", 4]
    named = ["no checkpoint of step 4 (steps: [3, 5])"]
  elif problem == "step_folder":
    args[args.index(run)] = run / "checkpoints" / "3"
    named = ["one checkpoint's folder", f"workdir {run} and step 3"]
  elif problem == "noema_file":
    dit_io.save_dit(saved[3]["params"], tmp_path / "p.msgpack", "flax", SMALL)
    args = args[:-4] + ["--src", tmp_path / "p.msgpack", "--src_format", "flax", "--noema"]
    named = ["training workdir only"]
  elif problem == "decoder_noema":
    args = ["--model", "decoder", "--config", f"{ROOT}/configs/decoder.py:tiny", "--src", run,
            "--src_format", "flax", "--noema"]
    named = ["--model dit only"]
  else:
    args = ["--model", "decoder", "--config", f"{ROOT}/configs/decoder.py:tiny", "--src", run,
            "--src_format", "flax"]
    named = ['is a `task = "dit"` training run, not a "decoder" one', "--model dit"]
  out = _cli(*args, "--dst", tmp_path / "out", "--dst_format", "diffusers")
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == 2, out.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("convert error: "), out.stderr[-3000:]
  assert all(n in lines[0] for n in named), lines[0]
  assert "compute_dtype" not in lines[0] and "scan_layers" not in lines[0]
  assert not (tmp_path / "out").exists()
