"""The config files and `launch/describe.py`: exact official parameter counts, nothing allocated."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import script_runs

ROOT = Path(__file__).resolve().parents[1]


def _describe(config: str, *overrides: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(ROOT / "launch/describe.py"), "--config", config,
                         *overrides], capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)


@pytest.mark.parametrize("variant,count", [("stage1_256", 2_611_246_336),
                                           ("stage3_1024", 2_611_246_336),
                                           ("test_08b", 784_896_640)])
def test_describe_prints_the_official_parameter_counts(variant, count):
  out = _describe(f"{ROOT}/configs/svg_t2i_2b.py:{variant}")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert lines[-1] == f"total parameters: {count}"
  assert any("layers/block/attention/to_q/kernel" in line for line in lines)


def test_unknown_variant_is_one_line_naming_the_variants():
  """(An unknown field is tests/test_cli.py's, for every script.)"""
  script_runs.assert_one_line(_describe(f"{ROOT}/configs/svg_t2i_2b.py:stage9"),
                              "config error: unknown variant 'stage9'; choose one of "
                              "['stage1_256', 'stage2_512', 'stage3_1024', 'stage4_sft', "
                              "'test_08b']")


def test_stage_variants_carry_the_official_recipe():
  from configs import svg_t2i_2b
  for variant, res in [("stage1_256", 256), ("stage2_512", 512), ("stage3_1024", 1024),
                       ("stage4_sft", 1024)]:
    c = svg_t2i_2b.get_config(variant)
    assert c.data.resolution == res and c.train.global_batch_size == 512
    assert (c.train.lr, c.train.b1, c.train.b2, c.train.eps, c.train.weight_decay) == (
        2e-4, 0.9, 0.95, 1e-15, 0.0)
    assert c.train.grad_clip == 2.0 and c.train.caption_dropout == 0.1
    assert c.data.max_caption_len == 256 and c.train.lr_schedule == "constant"
    assert (c.model.dim, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads) == (2304, 26, 24, 8)
