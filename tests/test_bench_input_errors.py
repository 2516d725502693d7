"""The benchmark and research scripts, and launch/make_demo_data.py, refuse bad input as every
script does (svg_jax/cli.py): one line on stderr naming the input, exit status 2, and before any
heavy work (no contender process, compile or dataset). An unknown flag, a missing or unknown config
file, an unknown model size, TPU target, remat policy or dtype, a bad flag value, a missing file."""
import os
import subprocess
import sys

import pytest

import script_runs

_TINY = "configs/tiny.py"
_UNKNOWN_FLAG = ("--bogus", ("flag error", "bogus"))
_UNKNOWN_SIZE = ("unknown 'bogus'", "bench/sizes.py", "tiny, calib")

CASES = {
    **{f"{script}-unknown-flag": (script, [_UNKNOWN_FLAG[0]], _UNKNOWN_FLAG[1]) for script in (
        "bench/train_step.py", "bench/sampling.py", "bench/malloc_settings.py", "bench/padding.py",
        "bench/cudnn_attention.py", "bench/validation.py", "research/gpu_roofline.py",
        "research/update_traffic.py")},
    # Unknown sizes are refused in the parent, before a contender's process starts.
    "train_step-unknown-size": ("bench/train_step.py", ["--sizes", "bogus", "--rounds", "1"],
                                ("--sizes",) + _UNKNOWN_SIZE),
    "train_step-unknown-dtype": ("bench/train_step.py", ["--dtypes", "float16"],
                                 ("--dtypes", "'float16'", "float32, bfloat16")),
    "sampling-unknown-size": ("bench/sampling.py", ["--sizes", "tiny,bogus", "--rounds", "1"],
                              ("--sizes",) + _UNKNOWN_SIZE),
    "malloc_settings-bad-batches": ("bench/malloc_settings.py", ["--batches", "x"],
                                    ("--batches", "positive integers")),
    "cudnn_attention-too-few-tokens": ("bench/cudnn_attention.py", ["--tokens", "50"],
                                       ("--tokens 50", "at least 112")),
    "gpu_roofline-no-config": ("research/gpu_roofline.py", [], ("flag error", "--config")),
    "gpu_roofline-missing-config": ("research/gpu_roofline.py", ["--config", "configs/nope.py"],
                                    ("configs/nope.py", "does not exist")),
    "gpu_roofline-unknown-remat": ("research/gpu_roofline.py",
                                   ["--config", _TINY, "--remats", "none,bogus"],
                                   ("--remats", "save_qkv_attn")),
    # Checked before the CUDA plugin is asked for the cards (it is not installed here).
    "gpu_roofline-mesh-over-gpus": ("research/gpu_roofline.py",
                                    ["--config", _TINY, "--config.mesh.fsdp=2", "--gpus", "3"],
                                    ("--gpus 3", "'fsdp': 2", "does not divide")),
    "update_traffic-no-config": ("research/update_traffic.py", [], ("flag error", "--config")),
    "update_traffic-missing-config": ("research/update_traffic.py", ["--config", "configs/nope.py"],
                                      ("configs/nope.py", "does not exist")),
    "update_traffic-bad-target": ("research/update_traffic.py",
                                  ["--config", _TINY, "--target", "v5e-7"],
                                  ("--target", "bad TPU target 'v5e-7'", "v5e-N")),
    "torch_trainer-missing-ours": ("bench/torch_trainer.py",
                                   ["--config", _TINY, "--ours", "/nonexistent/ours.json"],
                                   ("--ours /nonexistent/ours.json", "no such file")),
    "torch_trainer-ours-not-json": ("bench/torch_trainer.py",
                                    ["--config", _TINY, "--ours", "README.md"],
                                    ("--ours README.md", "not bench/trainer.py's JSON")),
    "validation-no-rounds": ("bench/validation.py", ["--rounds", "0"],
                             ("flag --rounds=0", "not a positive integer")),
    "make_demo_data-negative-count": ("launch/make_demo_data.py", ["--num_train", "-1"],
                                      ("--num_train must be >= 0",)),
}


@pytest.mark.parametrize("script, args, fragments", CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_and_exit_2(script, args, fragments, tmp_path):
  out_dir = tmp_path / "out"
  if script == "launch/make_demo_data.py":
    args = ["--out", str(out_dir), *args]
  out = subprocess.run([sys.executable, os.path.join(script_runs.REPO, script), *args],
                       cwd=script_runs.REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=180)
  script_runs.assert_one_line(out, *fragments)
  assert not out.stdout.strip(), out.stdout[-2000:]  # nothing measured or written before it
  assert not out_dir.exists()
