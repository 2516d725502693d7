"""Multi-host start-up: `launch/train.py` as several local processes under JAX's distributed
runtime (CPU collectives), started by the explicit JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID set that plain SSH or any launcher can give; a partial set is a one-line error."""
import os
import socket
import subprocess
import sys

import pytest

from svg_jax import parallel
from svg_jax.data import synthetic
from svg_jax.train import checkpoint as ckpt_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.in_channels=8", "--config.model.cap_feat_dim=16", "--config.model.dim=32",
        "--config.model.n_heads=2", "--config.model.n_kv_heads=1",
        "--config.model.axes_dims=(4,6,6)", "--config.model.n_layers=1",
        "--config.model.n_refiner_layers=1", "--config.model.multiple_of=32",
        "--config.data.caption_len_buckets=(16,)", "--config.data.max_caption_len=16"]


def _command(data_dir, workdir, steps):
  return [sys.executable, os.path.join(REPO, "launch", "train.py"),
          "--config", os.path.join(REPO, "configs", "tiny.py"), "--workdir", str(workdir),
          f"--config.data.path={data_dir}", f"--config.train.num_steps={steps}",
          "--config.train.global_batch_size=8", "--config.train.log_every=1",
          f"--config.train.checkpoint_every={steps}", *TINY]


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in parallel.EXPLICIT_ENV}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu", **extra)
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("data") / "ds"
  synthetic.write_random_dataset(str(path), buckets=((4, 4),), num_records=32, latent_channels=8,
                               text_dim=16, caption_len=(1, 8))
  return str(path)


@pytest.mark.parametrize("env, message", [
    (dict(JAX_COORDINATOR_ADDRESS="localhost:1234"), "JAX_NUM_PROCESSES, JAX_PROCESS_ID not"),
    (dict(JAX_COORDINATOR_ADDRESS="localhost:1234", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="2"),
     "outside [0, JAX_NUM_PROCESSES=2)"),
    (dict(JAX_COORDINATOR_ADDRESS="localhost", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="0"),
     "host:port"),
    (dict(JAX_COORDINATOR_ADDRESS="a:1", JAX_NUM_PROCESSES="two", JAX_PROCESS_ID="0"),
     "must be integers")])
def test_a_bad_explicit_set_is_one_line_and_exit_2(data_dir, tmp_path, env, message):
  out = subprocess.run(_command(data_dir, tmp_path / "run", 2), env=_env(**env),
                       capture_output=True, text=True, timeout=120)
  lines = [line for line in out.stderr.splitlines() if "multi-host setup error" in line]
  assert out.returncode == 2, out.stderr[-2000:]
  assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]
  assert "Traceback" not in out.stderr


def test_explicit_coordinator_starts_two_processes_that_train_together(data_dir, tmp_path):
  """Two processes x 2 CPU devices: both join one 4-device mesh (process 0 logs the global
  batch's loss), train, save the final step together and exit 0."""
  port = _free_port()
  workdir = tmp_path / "run"
  procs = [subprocess.Popen(
      _command(data_dir, workdir, 4),
      env=_env(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i)),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  for _, err in outs:  # the trainer's start-up line: one mesh over both processes' devices
    assert "over 4 devices" in err, err[-3000:]
  directory = ckpt_lib.checkpoint_dir(str(workdir))
  assert sorted(int(n) for n in os.listdir(directory) if n.isdigit()) == [4]
