"""bench/trainer.py as a user runs it: the real trainer on configs/tiny.py for a few steps, one JSON
line whose figures are present, positive and consistent with each other and with the run's own
metrics.jsonl, remat "auto" resolved on the way, no checkpoint written, and the profile of the
last warm-up step summarized (also by launch/profile_summary.py). Two host devices, so that the
per-device figures differ from the totals."""
import json
import os
import subprocess
import sys

import pytest

import script_runs
from svg_jax import checkpoint as ckpt_lib
from svg_jax import config as config_lib
from svg_jax.train import flop_count

from configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, STEPS, PEAK, DEVICES = 8, 2, 2.5, 2  # the batch splits over the devices
FIELDS = ("config", "platform", "device_kind", "devices", "global_batch_size", "latent_hw",
          "cap_len", "remat_policy", "attention_backend", "layer_loop", "compute_dtype",
          "warmup_steps", "steps", "steps_per_sec", "images_per_sec", "tokens_per_sec",
          "tflops_per_device", "tflops", "peak_tflops", "mfu", "peak_memory_gib", "compile_s",
          "remat_auto_s", "compilation_cache", "wall_s", "loss", "profile")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("bench") / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=script_runs.xla_flags(DEVICES))
  cmd = [sys.executable, os.path.join(REPO, "bench", "trainer.py"),
         "--config", os.path.join(REPO, "configs", "tiny.py"), f"--steps={STEPS}",
         f"--global_batch_size={BATCH}", f"--peak_tflops={PEAK}", f"--workdir={workdir}",
         "--config.model.remat_policy=auto", "--config.train.remat_memory_budget_gib=1000",
         "--config.model.attention_backend=auto", "--config.model.scan_layers=True",
         "--config.model.layer_loop=auto", "--profile_steps=1"]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1]), str(workdir)


def test_the_json_line_has_every_figure(run):
  result, _ = run
  assert set(FIELDS) <= set(result), set(FIELDS) - set(result)
  for key in ("steps_per_sec", "images_per_sec", "tokens_per_sec", "tflops_per_device", "tflops",
              "mfu", "compile_s", "remat_auto_s", "wall_s", "loss"):
    assert result[key] > 0, key
  assert result["platform"] == "cpu" and result["devices"] == DEVICES
  assert result["peak_memory_gib"] is None  # XLA:CPU keeps no allocator statistics
  assert result["remat_policy"] == "none"  # auto with 1000 GiB: no recomputation
  assert result["attention_backend"] == "xla"  # what the config's "auto" takes on a CPU
  assert result["layer_loop"] == "scan"  # likewise
  assert (result["global_batch_size"], result["steps"]) == (BATCH, STEPS)


def test_the_figures_agree(run):
  result, workdir = run
  assert result["images_per_sec"] == pytest.approx(result["steps_per_sec"] * BATCH, rel=1e-9)
  assert result["mfu"] == pytest.approx(result["tflops_per_device"] / PEAK, rel=1e-9)
  assert result["tflops"] == pytest.approx(result["tflops_per_device"] * result["devices"])
  h, w = result["latent_hw"]
  # The total is the model's FLOPs per step at the measured rate, however many devices share it.
  flops = flop_count.dit_train_flops(config_lib.nextdit_config(tiny.get_config()), BATCH, (h, w),
                                     result["cap_len"])
  assert result["tflops"] == pytest.approx(flops * result["steps_per_sec"] / 1e12, rel=1e-9)
  assert result["tokens_per_sec"] == pytest.approx(
      result["images_per_sec"] * (h * w + result["cap_len"]), rel=1e-9)  # patch size 1
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  steps = [r for r in records if "steps_per_sec" in r]
  # One record per window: compile + warm-up, then the measured steps.
  assert [r["step"] for r in steps] == [STEPS, 2 * STEPS]
  assert steps[-1]["steps_per_sec"] == result["steps_per_sec"]
  assert steps[-1]["loss"] == result["loss"]
  (event,) = [r for r in records if r.get("event") == "remat_policy"]
  assert event["policy"] == result["remat_policy"]


def test_no_checkpoint_is_written(run):
  _, workdir = run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert not [r for r in map(json.loads, f) if r.get("event") == "checkpoint"]
  directory = ckpt_lib.checkpoint_dir(workdir)
  assert not os.path.isdir(directory) or os.listdir(directory) == []


def test_the_last_warm_up_step_is_profiled(run):
  result, workdir = run
  profile = result["profile"]
  assert (profile["first_step"], profile["steps"]) == (STEPS, 1)  # after compile, before timing
  assert profile["path"].startswith(os.path.join(workdir, "tensorboard", "plugins", "profile"))
  assert profile["path"].endswith(".xplane.pb") and os.path.getsize(profile["path"]) > 0
  assert profile["ms_per_step"]["matmul"] > 0
  out = subprocess.run([sys.executable, os.path.join(REPO, "launch", "profile_summary.py"),
                        os.path.join(workdir, "tensorboard"), "--steps=1", "--top=5"],
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                       timeout=300, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert lines[0].startswith(profile["path"]) and lines[1] == "by class:"
  matmul = [line for line in lines if line.strip().startswith("matmul ")]
  assert len(matmul) == 1
  assert float(matmul[0].split()[1]) == pytest.approx(profile["ms_per_step"]["matmul"], abs=2e-3)
  assert len([line for line in lines if line.endswith("%")]) >= 5 + 1  # classes and top 5


def test_a_profile_without_a_workdir_is_refused():
  """Without --workdir the run folder is temporary: the trace the log points to would be gone."""
  import script_runs
  out = subprocess.run([sys.executable, os.path.join(REPO, "bench", "trainer.py"), "--config",
                        os.path.join(REPO, "configs", "tiny.py"), "--profile_steps=1"],
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                       timeout=300, cwd=REPO)
  script_runs.assert_one_line(out, "usage error: --profile_steps needs --workdir")
