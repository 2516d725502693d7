"""bench/torch_trainer.py as the GPU session runs it, on configs/tiny.py: the official trainer's
step in PyTorch (diffusers Lumina2, compiled block by block) beside bench/trainer.py run with the
same config overrides, one JSON line whose figures agree with each other and with ours."""
import json
import os
import subprocess
import sys

import pytest

import script_runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BATCH, STEPS = 8, 2


@pytest.fixture(scope="module")
def result():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=script_runs.xla_flags(1))
  cmd = [sys.executable, os.path.join(REPO, "bench", "torch_trainer.py"),
         "--config", os.path.join(REPO, "configs", "tiny.py"), "--steps", str(STEPS),
         f"--global_batch_size={BATCH}", "--peak_tflops=2.5", "--compile", "blocks",
         "--ours", "run", "--config.model.compute_dtype", "bfloat16"]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_torch_figures_agree(result):
  assert result["contender"] == "torch compile (blocks)"
  assert (result["global_batch_size"], result["steps"]) == (BATCH, STEPS)
  assert result["compute_dtype"] == "bfloat16" and result["checkpointing"]
  assert result["images_per_sec"] == pytest.approx(result["steps_per_sec"] * BATCH, rel=1e-9)
  assert result["mfu"] == pytest.approx(result["tflops"] / 2.5, rel=1e-9)
  h, w = result["latent_hw"]
  assert result["tokens_per_sec"] == pytest.approx(
      result["images_per_sec"] * (h * w + result["cap_len"]), rel=1e-9)  # patch size 1
  assert result["peak_memory_gib"] is None and result["compile_s"] > 0
  # A velocity regression from a random init: the loss is that of the target's scale (~2).
  assert 0.5 < result["loss"] < 5.0


def test_ours_ran_the_same_job(result):
  ours = result["ours"]
  for key in ("global_batch_size", "latent_hw", "cap_len", "compute_dtype", "steps",
              "peak_tflops"):
    assert ours[key] == result[key], key
  # Both count the same analytic FLOPs per image.
  assert ours["tflops"] / ours["images_per_sec"] == pytest.approx(
      result["tflops"] / result["images_per_sec"], rel=1e-9)
  assert result["speedup"] == pytest.approx(
      ours["images_per_sec"] / result["images_per_sec"], rel=1e-12)
