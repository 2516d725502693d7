"""bench/gpu_session.sh runs only where a GPU is lent, for minutes: a flag it passes that a
script does not define, or a config override of no field or of a value the model refuses, would
lose that time. Read statically here: its shell syntax, every flag of each bench script it runs,
and every `--config.` override against the stage configs it trains."""
import re
import subprocess
from pathlib import Path

import pytest

from configs import svg_t2i_2b
from svg_jax import config as config_lib

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPT = BENCH / "gpu_session.sh"
ARRAYS = re.compile(r"^(S1|S3|DOTS)\+?=\(")  # flag arrays every run of both scripts may take


def _logical_lines() -> list[str]:
  return SCRIPT.read_text().replace("\\\n", " ").splitlines()


def _defined_flags(script: str) -> set[str]:
  text = (BENCH / script).read_text()
  return set(re.findall(r"(?:DEFINE_\w+|define_config_file)\(\s*\"(\w+)\"", text))


def _flags(line: str) -> set[str]:
  line = re.sub(r"\b[A-Z_]+=\"[^\"]*\"", "", line)  # the environment a run is given
  return set(re.findall(r"(?<![\w-])--(\w+)(?![\w-])", line))


def test_the_script_is_valid_bash():
  out = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr


def test_every_flag_is_one_the_script_it_goes_to_defines():
  trainer, torch = _defined_flags("trainer.py"), _defined_flags("torch_trainer.py")
  checked = 0
  for line in _logical_lines():
    if ARRAYS.match(line.strip()):
      wanted, defined = _flags(line), trainer & torch
    elif "torch_trainer.py" in line:
      wanted, defined = _flags(line), torch
    elif re.search(r"\btrainer\.py\b", line):
      wanted, defined = _flags(line), trainer
    else:
      continue
    assert wanted <= defined, (sorted(wanted - defined), line.strip())
    checked += len(wanted)
  assert checked >= 20  # the runs were found


@pytest.mark.parametrize("variant", ["stage1_256", "stage3_1024"])
def test_every_config_override_is_a_field_and_a_value_the_model_takes(variant):
  overrides = re.findall(r"--config\.([\w.]+)=([\w.+-]+)", SCRIPT.read_text())
  assert len(overrides) >= 8
  for path, value in overrides:
    config = svg_t2i_2b.get_config(variant)
    section, _, name = path.rpartition(".")
    parent = config
    for part in section.split("."):
      parent = parent[part]  # KeyError: no such section
    assert name in parent, path
    kind = type(parent[name])
    parent[name] = (value.lower() == "true" if kind is bool else
                    kind(value) if kind in (int, float) else value)
    config_lib.nextdit_config(config)  # InputError: a value the model refuses
