"""Several hosts: `launch/train.py` as several local processes under JAX's distributed runtime
(CPU collectives), started by the explicit JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID set that plain SSH or any launcher can give (a partial set is a one-line error).

Processes x devices 1x4, 2x2 and 4x1 train on the same batches with the same noise, so their
losses agree to float noise; a signal to one process or to all of them stops every process at
one step with one checkpoint and exit 0; a killed process takes the others down with it instead
of leaving them hanging, and one that stops moving ends the other with its stacks (the stall
watch), which does not time a slower host's compiles; a checkpoint of 2 processes resumes on 1,
then on 4, and back; the in-training validation of 2 processes logs what 1 process logs. Every
subprocess wait has a timeout, so a hang fails the test instead of blocking the suite."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import local_hosts
import script_runs
import validation_files
from svg_jax import multihost
from svg_jax.data import pipeline, synthetic
from svg_jax.demo import text_encoder as demo_text
from svg_jax import checkpoint as ckpt_lib
from svg_jax.train import host_consistency, remat

pytestmark = pytest.mark.serial  # several processes, heartbeats and watches in seconds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.in_channels=8", "--config.model.cap_feat_dim=16", "--config.model.dim=32",
        "--config.model.n_heads=2", "--config.model.n_kv_heads=1",
        "--config.model.axes_dims=(4,6,6)", "--config.model.n_layers=1",
        "--config.model.n_refiner_layers=1", "--config.model.multiple_of=32",
        "--config.data.caption_len_buckets=(16,)", "--config.data.max_caption_len=16"]
# The validation test's offline text encoder: features of TINY's cap_feat_dim.
_TEXT = demo_text.DemoSpec(vocab_size=320, hidden_size=16, num_layers=1, num_heads=2,
                           num_kv_heads=1, head_dim=8, intermediate_size=32)


def _command(data_dir, workdir, steps):
  return [sys.executable, os.path.join(REPO, "launch", "train.py"),
          "--config", os.path.join(REPO, "configs", "tiny.py"), "--workdir", str(workdir),
          f"--config.data.path={data_dir}", f"--config.train.num_steps={steps}",
          "--config.train.global_batch_size=8", "--config.train.log_every=1",
          f"--config.train.checkpoint_every={steps}", *TINY]


def _env(**extra):
  """The launches compile the same few programs: the session's compilation cache
  (tests/conftest.py) keeps every one of them, so all but the first launch of each layout skip
  most of their compile time."""
  env = {k: v for k, v in os.environ.items() if k not in multihost.EXPLICIT_ENV}
  env.update(XLA_FLAGS=script_runs.xla_flags(2), JAX_PLATFORMS="cpu",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.update(extra)
  return env


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
     "must be integers"),
    (dict(JAX_COORDINATOR_ADDRESS="nohost.invalid:1234", JAX_NUM_PROCESSES="2",
          JAX_PROCESS_ID="1"), "the coordinator's host 'nohost.invalid' (JAX_COORDINATOR_ADDRESS) "
     "cannot be resolved")])
def test_a_bad_explicit_set_is_one_line_and_exit_2(data_dir, tmp_path, env, message):
  out = subprocess.run(_command(data_dir, tmp_path / "run", 2), env=_env(**env),
                       capture_output=True, text=True, timeout=120)
  lines = [line for line in out.stderr.splitlines() if "multi-host setup error" in line]
  assert out.returncode == 2, out.stderr[-2000:]
  assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]
  assert "Traceback" not in out.stderr


@pytest.mark.parametrize("process", [0, 1])
def test_a_process_whose_peer_never_starts_ends_after_the_init_timeout(data_dir, tmp_path,
                                                                       process):
  """Process 0 of 2 alone (the coordinator, waiting for its peer) or process 1 alone (nothing
  listens at the coordinator's address): it ends after train.distributed_init_timeout_s (5 s
  here), not after JAX's default of 300 s, with one line and exit 2, not JAX's C++ abort."""
  started = time.monotonic()
  out = subprocess.run(_command(data_dir, tmp_path / "run", 2) + [
      "--config.train.distributed_init_timeout_s=5"],
      env=local_hosts.host_env(_env(), local_hosts.free_port(), 2, process), capture_output=True,
      text=True, timeout=120)
  assert out.returncode == 2 and time.monotonic() - started < 90, out.stderr[-2000:]
  assert f"process {process} of 2" in out.stderr and (
      "waiting up to 5 s for every process to join") in out.stderr, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("multi-host setup error: process") and (
      "not every process joined within 5 s") in last, out.stderr[-2000:]
  assert "Check failure" not in out.stderr, out.stderr[-2000:]
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("reuse_port", [False, True], ids=["another_program", "a_coordinator"])
def test_a_coordinator_port_taken_by_another_program_is_one_line(data_dir, tmp_path, reuse_port):
  """Another program listening on the port made JAX's coordinator segfault; a listener that
  shares ports as gRPC does (an earlier run's coordinator still ending) does not stop it."""
  port = local_hosts.free_port()
  with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as taken:
    if reuse_port:
      taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    taken.bind(("::", port))
    taken.listen(1)
    out = subprocess.run(_command(data_dir, tmp_path / "run", 2) + [
        "--config.train.distributed_init_timeout_s=3"],
        env=local_hosts.host_env(_env(), port, 2, 0), capture_output=True, text=True, timeout=120)
  last = out.stderr.strip().splitlines()[-1]
  assert out.returncode == 2, out.stderr[-2000:]
  if reuse_port:  # JAX served the port and waited for process 1
    assert "not every process joined within 3 s" in last, out.stderr[-2000:]
  else:
    assert last == (f"multi-host setup error: port {port} on this host (process 0 serves the "
                    "coordinator there) is taken by another program; choose another port in "
                    "JAX_COORDINATOR_ADDRESS on every host"), out.stderr[-2000:]


def test_explicit_coordinator_starts_two_processes_that_train_together(data_dir, tmp_path):
  """Two processes x 2 CPU devices: both join one 4-device mesh (process 0 logs the global
  batch's loss), train, save the final step together and exit 0. Process 1 reads its own copy of
  the records at another path (a host's local copy)."""
  port = local_hosts.free_port()
  workdir = tmp_path / "run"
  copy = shutil.copytree(data_dir, tmp_path / "local_copy")
  procs = [local_hosts.popen(_command(data_dir if i == 0 else copy, workdir, 4),
                             local_hosts.host_env(_env(), port, 2, i)) for i in range(2)]
  codes, errs = local_hosts.wait(procs, 300)
  for code, err in zip(codes, errs):
    assert code == 0, err[-3000:]
  for err in errs:  # the trainer's start-up line: one mesh over both processes' devices
    assert "over 4 devices" in err, err[-3000:]
  directory = ckpt_lib.checkpoint_dir(str(workdir))
  assert sorted(int(n) for n in os.listdir(directory) if n.isdigit()) == [4]


def test_processes_started_with_different_settings_stop_before_training(data_dir, tmp_path):
  """Process 1 with another batch size, another dataset and a workdir of its own: both stop at
  once with one line naming all three (they trained to the end on mixed batches before)."""
  other = tmp_path / "other_data"
  synthetic.write_random_dataset(str(other), buckets=((4, 4),), num_records=24, latent_channels=8,
                                 text_dim=16, caption_len=(1, 8))
  port = local_hosts.free_port()
  commands = [_command(data_dir, tmp_path / "run", 4),
              _command(other, tmp_path / "run_b", 4) + ["--config.train.global_batch_size=16"]]
  procs = [local_hosts.popen(commands[i], local_hosts.host_env(_env(), port, 2, i))
           for i in range(2)]
  codes, errs = local_hosts.wait(procs, 120)
  assert codes == [2, 2], [e[-2000:] for e in errs]
  for me, other_process, err in ((0, 1, errs[0]), (1, 0, errs[1])):
    # Its own line (beside it, the other's, printed as "process k ended before this one: ...").
    line = [x for x in err.splitlines() if x.startswith("multi-host setup error: the processes")]
    assert len(line) == 1 and line[0].startswith("multi-host setup error:"), err[-2000:]
    mine, theirs = (8, 16) if me == 0 else (16, 8)
    assert (f"train.global_batch_size: {mine} here, {theirs} on process {other_process}"
            in line[0]), line[0]
    assert "data.path (its manifest): manifest sha256:" in line[0], line[0]
    shared = ("yes here, no" if me == 0 else "no here, yes")
    assert f"{host_consistency.SHARED_WORKDIR}: {shared}" in line[0], line[0]
  assert not (tmp_path / "run" / "checkpoints" / "4").exists()


def test_a_config_error_on_one_process_ends_the_other_at_once_naming_it(data_dir, tmp_path):
  """Process 1 alone has a bad value: it ends with its line, and process 0, waiting to compare
  configs with it, ends at once with process 1's line beside its own (it waited out JAX's
  heartbeat, 100 s, and aborted with a C++ stack)."""
  port = local_hosts.free_port()
  started, exits = time.monotonic(), []
  procs = [local_hosts.popen(_command(data_dir, tmp_path / "run", 4) + (
      ["--config.train.lr=-1"] if i == 1 else []), local_hosts.host_env(_env(), port, 2, i))
           for i in range(2)]
  codes, errs = local_hosts.wait(procs, 120, exits)
  assert codes == [2, 2], [e[-2000:] for e in errs]
  assert max(exits) - started < 60, exits
  cause = "config error: train.lr must be > 0, got -1.0"
  assert any(line.startswith(cause) for line in errs[1].splitlines()), errs[1][-2000:]
  lines = errs[0].splitlines()
  own = lines.index("multi-host setup error: process 1 ended before the processes compared their "
                    "configs, records and workdir (its line follows)")
  assert lines[own + 1].startswith(f"process 1 ended before this one, exit 2: {cause}"), (
      errs[0][-2000:])
  assert "Check failure" not in errs[0]


def test_sigterm_ends_a_starting_process_of_several_at_once(tmp_path):
  """After the processes have joined, SIGTERM ends a process still starting (as on one host),
  instead of JAX's preemption service taking it while the trainer's handler is not yet there."""
  script = tmp_path / "start.py"
  script.write_text("import time\nfrom svg_jax import multihost\n"
                    "multihost.initialize_distributed()\nprint('joined', flush=True)\n"
                    "time.sleep(120)\n")
  port = local_hosts.free_port()
  procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.DEVNULL, env=local_hosts.host_env(_env(), port, 2, i))
           for i in range(2)]
  try:
    first = []  # read in a thread: a process that never joins must fail the test, not hang it
    reader = threading.Thread(target=lambda: first.append(procs[1].stdout.readline()),
                              daemon=True)
    reader.start()
    reader.join(120)
    assert [line.strip() for line in first] == ["joined"]
    procs[1].send_signal(signal.SIGTERM)
    assert procs[1].wait(timeout=20) == -signal.SIGTERM
  finally:
    for p in procs:
      p.kill()
      p.wait()


@pytest.mark.parametrize("wait_s, ends_well", [(4, False), (90, True)])
def test_a_process_done_first_waits_for_the_others_within_its_shutdown_wait(tmp_path, wait_s,
                                                                           ends_well):
  """Processes that share no work (benchmark generation) end apart: process 1 is done 15 s after
  process 0. Past JAX's exit wait every process is aborted (shown with a 4 s wait, for JAX's
  300 s default); within `shutdown_timeout_s` both end well."""
  script = tmp_path / "apart.py"
  script.write_text("import sys, time\nimport jax\nfrom svg_jax import multihost\n"
                    "multihost.initialize_distributed(shutdown_timeout_s=int(sys.argv[1]))\n"
                    "time.sleep(15 * jax.process_index())\n")
  port = local_hosts.free_port()
  procs = [local_hosts.popen([sys.executable, str(script), str(wait_s)],
                             local_hosts.host_env(_env(), port, 2, i)) for i in range(2)]
  codes, errs = local_hosts.wait(procs, timeout=150)
  if ends_well:
    assert codes == [0, 0], errs
  else:
    assert codes[0] != 0 and "barrier" in errs[0].lower(), (codes, errs[0][-2000:])


# ----------------------------------------------------------------------------- several processes


def _launch(data_dir, workdir, steps, processes, devices, *extra, env_of=None):
  """`processes` local processes of launch/train.py with `devices` CPU devices each; `env_of`
  maps a process index to variables of its own environment."""
  port = local_hosts.free_port()
  procs = []
  for i in range(processes):
    env = local_hosts.host_env(_env(), port, processes, i) if processes > 1 else _env()
    env["XLA_FLAGS"] = script_runs.xla_flags(devices)
    env.update((env_of or {}).get(i, {}))
    procs.append(local_hosts.popen(_command(data_dir, workdir, steps) + list(extra), env))
  return procs


def _python_path_with_hook(folder, code):
  """A PYTHONPATH under which a launched process imports `code` at start-up (a sitecustomize
  module in `folder`), before the environment's own PYTHONPATH."""
  folder.mkdir()
  (folder / "sitecustomize.py").write_text(code)
  return os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p)


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _losses(workdir):
  return {r["step"]: r["loss"] for r in _records(workdir) if "loss" in r}


def _run(data_dir, workdir, steps, processes, devices, *extra, timeout=400, env_of=None):
  codes, errs = local_hosts.wait(_launch(data_dir, workdir, steps, processes, devices, *extra,
                              env_of=env_of), timeout)
  assert codes == [0] * processes, errs[0][-3000:] + errs[-1][-3000:]
  return errs


STEPS = 9


@pytest.fixture(scope="module")
def one_process_run(data_dir, tmp_path_factory):
  """1 process x 4 devices, uninterrupted: step -> loss."""
  workdir = tmp_path_factory.mktemp("ref1x4")
  _run(data_dir, workdir, STEPS, 1, 4)
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  return losses


def test_loader_rows_make_the_same_global_batches_on_any_process_count(data_dir):
  """The local batches of 2 processes (and of 4) put together are the 1-process global batch,
  record for record, also after a resume that changes the process count (`combine_states`)."""
  def take(processes, n, state=None):
    its = [pipeline.make_pipeline(data_dir, dict(per_process_batch_size=8 // processes,
                                                 max_caption_len=16, caption_len_buckets=(16,)),
                                  process_index=p, process_count=processes)
           for p in range(processes)]
    if state is not None:
      for p, it in enumerate(its):
        it.set_state_of_processes(state, p)
    batches = [[next(it) for _ in range(n)] for it in its]
    sources = [np.concatenate([b[k]["source"] for b in batches]).tolist() for k in range(n)]
    return sources, [it.get_state() for it in its]

  one, _ = take(1, 12)  # 12 x 8 examples: three epochs of the 32 records
  assert all(len(set(b)) == 8 for b in one)
  epochs = [sorted(sum(one[e * 4:(e + 1) * 4], [])) for e in range(3)]
  assert epochs[0] == epochs[1] == epochs[2] and len(set(epochs[0])) == 32
  assert sum(one[0:4], []) != sum(one[4:8], [])  # every epoch is a new permutation
  for processes in (2, 4):
    got, _ = take(processes, 12)
    assert got == one, processes
  first, states = take(2, 5)
  rest, _ = take(4, 7, state=states)  # saved by 2 processes, resumed by 4
  assert first + rest == one
  back, states4 = take(4, 5)
  rest, _ = take(1, 7, state=states4)
  assert back + rest == one
  _, states3 = take(2, 3)  # states of two runs at other positions: not one run's
  with pytest.raises(ValueError, match="2 saved loader states disagree on the position"):
    take(2, 1, state=[states[0], states3[1]])


def _assert_same_losses(workdir, reference, label):
  """The run in `workdir` logged a loss at every step of `reference`, each within 1e-6."""
  got = _losses(workdir)
  diff = max(abs(got[s] - reference[s]) for s in reference)
  print(f"{label}: max |loss diff| {diff:.3g}")
  assert sorted(got) == sorted(reference) and diff <= 1e-6


def test_two_processes_train_like_one(data_dir, one_process_run, tmp_path):
  """2 processes x 2 devices: the losses of 1 process x 4 devices, step for step."""
  _run(data_dir, tmp_path, STEPS, 2, 2)
  _assert_same_losses(tmp_path, one_process_run, "1x4 vs 2x2")


@pytest.mark.slow
def test_a_checkpoint_resumes_on_another_process_count(data_dir, one_process_run, tmp_path):
  """2x2 to step 3, 1x4 on to step 5, 4x1 to step 7, 2x2 on to the end: the losses of the
  uninterrupted run (the data position travels as one global number, the state onto each
  mesh)."""
  for steps, processes, devices in ((3, 2, 2), (5, 1, 4), (7, 4, 1), (STEPS, 2, 2)):
    _run(data_dir, tmp_path, steps, processes, devices)
  resumes = [r["step"] for r in _records(tmp_path) if r.get("event") == "resume"]
  assert resumes == [3, 5, 7]
  _assert_same_losses(tmp_path, one_process_run, "2x2 -> 1x4 -> 4x1 -> 2x2 against 1x4")


FSDP = ["--config.mesh.data=1", "--config.mesh.fsdp=4"]  # each process reads its own shards


@pytest.mark.slow
def test_a_damaged_checkpoint_is_read_twice_then_moved_aside_by_all(data_dir, one_process_run,
                                                                    tmp_path):
  """2 processes, step 6's data files of process 1 truncated to half: each process reads the step
  twice (a "reading it once more" line each), they agree, process 0 moves it aside, and both
  resume from step 3 with the losses of the uninterrupted run. (Truncating the largest file only
  once left every array it was read for intact: the restore went on from step 6.)"""
  _run(data_dir, tmp_path, 6, 2, 2, *FSDP, "--config.train.checkpoint_every=3")
  state = os.path.join(ckpt_lib.checkpoint_dir(str(tmp_path)), "6", "state")
  own = [os.path.join(d, f) for d, _, fs in os.walk(state) for f in fs
         if "ocdbt.process_1" in d and "/d" in d]
  assert own, sorted(os.listdir(state))
  for path in own:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  errs = _run(data_dir, tmp_path, STEPS, 2, 2, *FSDP, "--config.train.checkpoint_every=3")
  for err in errs:
    assert err.count("reading it once more") == 1 and err.count("cannot be restored") == 1
  assert "(on another process); reading it once more" in errs[0]  # process 0's shards are intact
  aside = os.path.join(str(tmp_path), ckpt_lib.DAMAGED_SUBDIR)
  assert f"moved to {os.path.join(aside, '6')}; restoring step 3" in errs[0]
  assert os.listdir(aside) == ["6"]
  assert [r["step"] for r in _records(tmp_path) if r.get("event") == "resume"] == [3]
  _assert_same_losses(tmp_path, one_process_run, "2x2 resumed past a damaged step")


# Imported at start-up by the one process whose PYTHONPATH leads to it: that process's first
# checkpoint restore fails as a network filesystem's read may, every later one reads the files.
_FAILS_ONCE = """
from svg_jax import checkpoint
_restore, _failed = checkpoint.Checkpointer.restore, []
def restore(self, *args, **kwargs):
  if not _failed:
    _failed.append(True)
    raise OSError("Connection reset by peer")
  return _restore(self, *args, **kwargs)
checkpoint.Checkpointer.restore = restore
"""


@pytest.mark.slow
def test_a_restore_that_fails_on_one_process_is_read_again_by_all(data_dir, one_process_run,
                                                                   tmp_path):
  """2 processes; process 1's first restore of step 6 fails with a passing error, process 0's
  succeeds: both read step 6 once more, together, and resume from it with the losses of the
  uninterrupted run. Nothing is moved aside."""
  workdir = tmp_path / "run"
  _run(data_dir, workdir, 6, 2, 2, "--config.train.checkpoint_every=3")
  path = _python_path_with_hook(tmp_path / "fails_once", _FAILS_ONCE)
  errs = _run(data_dir, workdir, STEPS, 2, 2, "--config.train.checkpoint_every=3",
              env_of={1: {"PYTHONPATH": path}})
  assert "reading it once more" in errs[0] and "(on another process)" in errs[0]
  assert "reading it once more" in errs[1] and "Connection reset by peer" in errs[1]
  assert not any("cannot be restored" in err for err in errs)
  assert not os.path.exists(os.path.join(str(workdir), ckpt_lib.DAMAGED_SUBDIR))
  events = [(r["step"], r.get("event")) for r in _records(workdir) if r.get("event")
            in ("restore_retry", "resume")]
  assert events == [(6, "restore_retry"), (6, "resume")]
  _assert_same_losses(workdir, one_process_run, "2x2 resumed after one process's retry")


# Imported at start-up by process 1 alone: its reads of train.init_from's checkpoint fail, the
# first one only (FAILS = 1) or every one.
_INIT_FROM_FAILS = """
import os
from svg_jax import checkpoint
_load, _failed = checkpoint.load_params, []
def load_params(*args, **kwargs):
  if len(_failed) < int(os.environ["FAILS"]):
    _failed.append(True)
    raise OSError("Input/output error")
  return _load(*args, **kwargs)
checkpoint.load_params = load_params
"""


@pytest.mark.slow
def test_init_from_that_one_process_cannot_read_is_read_again_then_one_line_on_all(data_dir,
                                                                                   tmp_path):
  """2 processes start from another run's params (train.init_from); process 1 cannot read them.
  Read failing every time: both processes end with one config-error line and exit 2 (process 0,
  whose read succeeded, says so of another process); nobody waits on the other. Failing once:
  both read again, together, and train from those params."""
  source = tmp_path / "stage1"
  _run(data_dir, source, 2, 1, 4)
  path = _python_path_with_hook(tmp_path / "hook", _INIT_FROM_FAILS)
  init = f"--config.train.init_from={source}"
  codes, errs = local_hosts.wait(_launch(data_dir, tmp_path / "always", 3, 2, 2, init,
                              env_of={1: {"PYTHONPATH": path, "FAILS": "1000"}}), 300)
  assert codes == [2, 2], errs[0][-3000:] + errs[1][-3000:]
  own = [f"config error: train.init_from {source} cannot be loaded on another process",
         f"config error: train.init_from {source}: its checkpoint cannot be read "
         "(OSError: Input/output error)"]
  for i, err in enumerate(errs):
    # (Lines from multiprocessing's resource tracker, which outlives the process, left out.)
    lines = [line for line in err.strip().splitlines()
             if "resource_tracker" not in line and "warnings.warn" not in line]
    # Its own line last, or before the other's when that one left first (both stop together).
    assert own[i] in lines, err[-3000:]
    assert lines[lines.index(own[i]) + 1:] in (
        [], [f"process {1 - i} ended before this one, exit 2: {own[1 - i]}"]), err[-3000:]
  assert all(err.count("reading it once more") == 1 for err in errs)

  workdir = tmp_path / "once"
  errs = _run(data_dir, workdir, 3, 2, 2, init, env_of={1: {"PYTHONPATH": path, "FAILS": "1"}})
  assert "(on another process); reading it once more" in errs[0]
  assert "Input/output error" not in errs[0] and "Input/output error" in errs[1]
  assert [r.get("source") for r in _records(workdir) if r.get("event") == "init_from"] == [
      str(source)]
  assert sorted(_losses(workdir)) == [1, 2, 3]


# Imported at start-up by process 1 alone: its second checkpoint save finds the disk full.
_SECOND_SAVE_FAILS = """
import orbax.checkpoint as ocp
_save, _calls = ocp.CheckpointManager.save, []
def save(self, *args, **kwargs):
  _calls.append(1)
  if len(_calls) == 2:
    raise OSError(28, "No space left on device")
  return _save(self, *args, **kwargs)
ocp.CheckpointManager.save = save
"""


@pytest.mark.slow
@pytest.mark.parametrize("failing", [1, 0], ids=["process_1", "process_0_the_coordinator"])
def test_a_save_that_fails_on_one_process_stops_all_within_the_heartbeat(data_dir,
                                                                         one_process_run,
                                                                         tmp_path, failing):
  """2 processes with 2 loader worker processes each; one cannot write step 6: it ends with one
  checkpoint-error line (exit 6) at once, and the other, left waiting for it inside the save, is
  stopped within the heartbeat (15 s) instead of both waiting 5 minutes in barriers and
  aborting. No worker outlives its process (one would hold the pipe this test reads). Step 3 is
  intact, and (checked once, after process 1 failed) a rerun resumes from it with the losses of
  the uninterrupted run. When process 1 failed, process 0's log names the cause; when process 0
  failed, the key-value store went with it, and process 1 ends with its own line without waiting
  for the store."""
  other = 1 - failing
  workdir = tmp_path / "run"
  path = _python_path_with_hook(tmp_path / "disk_full", _SECOND_SAVE_FAILS)
  flags = ("--config.train.checkpoint_every=3", "--config.train.heartbeat_timeout_s=15",
           "--config.data.num_workers=2")
  start, exits = time.monotonic(), []
  codes, errs = local_hosts.wait(_launch(data_dir, workdir, STEPS, 2, 2, *flags,
                              env_of={failing: {"PYTHONPATH": path}}), 240, exits)
  print(f"exits {codes} {[round(t - start, 1) for t in exits]} s after the start")
  assert codes[failing] == 6 and codes[other] not in (0, None), errs[0][-3000:] + errs[1][-3000:]
  # (Lines after it come from multiprocessing's resource tracker, which outlives the process.)
  cause = (f"checkpoint error: writing checkpoint 6 to {ckpt_lib.checkpoint_dir(str(workdir))} "
           "failed (OSError: [Errno 28] No space left on device); the checkpoints up to step 3 "
           "are intact: make the checkpoint folder writable (space, permissions) and rerun the "
           "same command to resume from there")
  assert cause in errs[failing].splitlines()
  # The other's own error only says that its peer went away; the cause is printed beside it.
  noted = f"process {failing} ended before this one, exit 6: {cause}" in errs[other].splitlines()
  assert noted == (failing == 1), errs[other][-3000:]
  # Within the heartbeat (15 s) plus a margin for a loaded machine (the peer usually sees the
  # closed connection within 2 s); waiting out JAX's default heartbeat (100 s) would fail it.
  assert exits[other] - exits[failing] < 40, exits
  assert ckpt_lib.Checkpointer(str(workdir), read_only=True).all_steps() == [3]
  if failing == 0:  # the resume after either failure is the same code path; one run checks it
    return
  _run(data_dir, workdir, STEPS, 2, 2, *flags)
  assert [r["step"] for r in _records(workdir) if r.get("event") == "resume"] == [3]
  _assert_same_losses(workdir, one_process_run, "2x2 resumed after a failed save")


def _wait_for_step(procs, workdir, k, timeout=300):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if any(p.poll() is not None for p in procs):
      codes, errs = local_hosts.wait(procs, 30)
      raise AssertionError(f"a process ended early (exit statuses {codes})\n" + "\n".join(
          f"process {i}:\n{err[-4000:]}" for i, err in enumerate(errs)))
    if os.path.exists(path) and any(r.get("step", 0) >= k and "loss" in r
                                    for r in _records(workdir)):
      return
    time.sleep(0.05)
  raise AssertionError(f"no step {k} within {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("targets", [(1,), (0, 1)], ids=["one", "both_1s_apart"])
def test_a_signal_stops_every_process_at_one_step(data_dir, tmp_path, targets):
  """SIGTERM to process 1 alone, or to both a second apart: both stop at the same step, save it
  together and exit 0 (before the stop agreement, each stopped at its own step and the other hung
  in a collective)."""
  procs = _launch(data_dir, tmp_path, 100_000, 2, 2, "--config.train.checkpoint_every=100000")
  try:
    _wait_for_step(procs, tmp_path, 3)
    for n, i in enumerate(targets):
      if n:
        time.sleep(1.0)
      procs[i].send_signal(signal.SIGTERM)
    sent = time.monotonic()
    codes, errs = local_hosts.wait(procs, 120)
  finally:
    for p in procs:
      p.kill()
  print(f"both exited {time.monotonic() - sent:.1f} s after the last signal")
  assert codes == [0, 0], errs[0][-3000:] + errs[1][-3000:]
  saved = [int(line.split("saved step ")[1].split()[0]) for e in errs for line in e.splitlines()
           if "saved step" in line]
  assert len(saved) == 2 and saved[0] == saved[1], saved
  assert sorted(int(n) for n in os.listdir(ckpt_lib.checkpoint_dir(str(tmp_path)))) == saved[:1]
  stopped = [r for r in _records(tmp_path) if r.get("event") == "stopped"]
  assert [r["step"] for r in stopped] == saved[:1]
  assert [r["step"] for r in _records(tmp_path) if r.get("event") == "checkpoint"] == saved[:1]


def _process_0_after_a_signal_to_process_1(data_dir, workdir, sig, timeout, *flags):
  """Two processes training for ever; after step 3, `sig` to process 1: (process 0's exit
  status, its stderr); how long it took after the signal is printed."""
  procs = _launch(data_dir, workdir, 100_000, 2, 2, "--config.train.checkpoint_every=100000",
                  *flags)
  try:
    _wait_for_step(procs, workdir, 3)
    procs[1].send_signal(sig)
    sent = time.monotonic()
    codes, errs = local_hosts.wait(procs[:1], timeout)
  finally:
    procs[1].send_signal(signal.SIGCONT)
    for p in procs:
      p.kill()
  print(f"process 0 exited with {codes[0]} {time.monotonic() - sent:.1f} s after the {sig.name}")
  return codes[0], errs[0]


@pytest.mark.slow
def test_a_stalled_run_ends_with_its_stacks_and_exit_7(data_dir, tmp_path):
  """Process 1 stopped (SIGSTOP: alive, silent) after step 3: process 0 waits for it in a
  collective, and its stall watch (train.stall_timeout_s, 10 s here) ends it with every thread's
  stack, the training loop's frame among them, one line and exit 7, long before JAX's heartbeat
  (60 s here) would have stopped it."""
  code, err = _process_0_after_a_signal_to_process_1(
      data_dir, tmp_path, signal.SIGSTOP, 50, "--config.train.stall_timeout_s=10",
      "--config.train.heartbeat_timeout_s=60")
  assert code == 7, err[-3000:]
  assert re.search(r"stalled: no step ended for 10 s after step \d+ \(train.stall_timeout_s\)",
                   err), err[-3000:]
  stacks = err[err.index("(most recent call first)"):]
  assert re.search(r'File ".*svg_jax/train/loop\.py", line \d+ in train', stacks), stacks[-3000:]


# Imported at start-up by both processes of the validation test, as when one host's compilation
# cache misses and the other's hits: on process 1, remat auto's candidate compiles and each
# compile of the train step take 8 s longer, longer than the 6 s watch; the first lowering of
# each validation program too (process 1: the sampler's and the held-out loss's; process 0: its
# decoder's). Each sleep prints `slowed <what>` to stderr, which the test checks.
_SLOW_COMPILES = """
import os
import sys
import time
from jax import monitoring
from svg_jax.train import dit_task, remat
_PROCESS = os.environ["JAX_PROCESS_ID"]
_NAMES = {"0": {"decode_latents"}, "1": {"trajectory", "_per_sample"}}[_PROCESS]
def _sleep(what):
  print(f"slowed {what}", file=sys.stderr, flush=True)
  time.sleep(8)
def _slow(event, duration, **kwargs):
  if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
    fun = str(kwargs.get("fun_name", ""))
    for name in [n for n in _NAMES if n in fun]:
      _NAMES.discard(name)
      _sleep(f"{name} ({fun})")
monitoring.register_event_duration_secs_listener(_slow)
if _PROCESS == "1":
  _compile, _choose = dit_task.DiTSetup.compile_step, remat.choose
  def compile_step(self, *args):
    _sleep("compile_step")
    return _compile(self, *args)
  def choose(*args, **kwargs):
    _sleep("remat.choose")
    return _choose(*args, **kwargs)
  dit_task.DiTSetup.compile_step, remat.choose = compile_step, choose
"""


def _validation_flags(files):
  """Grids at steps 2 and 4, the held-out loss at 3 and 4, the files of validation_files."""
  decoder = [f"--config.autoencoder.decoder.{k}={v}" for k, v in validation_files.DECODER.items()]
  return [*decoder, f"--config.autoencoder.decoder_path={files['decoder']}",
          f"--config.autoencoder.stats_path={files['stats']}",
          f"--config.data.eval_path={files['heldout']}", "--config.train.sample_every=2",
          "--config.train.eval_every=3",
          f"--config.validation.prompts={tuple(validation_files.PROMPTS)!r}",
          f"--config.validation.text_features={files['features']}",
          "--config.validation.system_prompt=empty",
          f"--config.validation.resolution={validation_files.RES}", "--config.validation.steps=3",
          "--config.validation.loss_records=10", "--config.validation.loss_batch_size=4"]


def _evals(workdir):
  """step -> the held-out losses; step -> the grid (process 0 wrote it)."""
  losses = {r["step"]: {k: v for k, v in r.items() if k.startswith("loss_")}
            for r in _records(workdir) if r.get("event") == "eval" and "loss_mean" in r}
  return losses, validation_files.grids(workdir)


@pytest.mark.slow
def test_two_hosts_wait_for_no_compile_and_validate_as_one(tmp_path):
  """2 processes x 2 devices with remat auto, sample grids and the held-out loss, each process's
  compiles 8 s longer under a 6 s watch (above; each process's log names every compile slowed):
  the run ends, as the watch does not time the compiles (the step's and remat auto's, and the
  validation's, which come with the first step); its held-out losses are a 1 process x 4
  devices run's, its grids the same images up to uint8 rounding. Before, the watch stopped
  process 0 in remat auto's vote or at the first step (`stalled: running step 1 (after its
  compile) took over 6 s`) or at the first validation, and process 0 could not decode on its
  devices inside the run on every host's (an error at the first grid)."""
  files = validation_files.write(tmp_path, _TEXT)
  path = _python_path_with_hook(tmp_path / "slow_compiles", _SLOW_COMPILES)
  flags = [*_validation_flags(files), "--config.model.remat_policy=auto",
           "--config.train.remat_memory_budget_gib=1000"]
  errs = _run(files["train"], tmp_path / "two", 4, 2, 2, *flags,
              "--config.train.stall_timeout_s=6", env_of={0: {"PYTHONPATH": path},
                                                          1: {"PYTHONPATH": path}})
  assert not any("stalled:" in err for err in errs), errs[0][-3000:]
  # Each slowed compile came (a renamed program would leave its compile fast and the test void).
  slowed = [re.findall(r"\bslowed (\S+)", err) for err in errs]
  assert sorted(slowed[0]) == ["decode_latents"], slowed
  assert sorted(set(slowed[1])) == ["_per_sample", "compile_step", "remat.choose", "trajectory"], (
      slowed)
  records = _records(tmp_path / "two")
  assert [r["source"] for r in records if r.get("event") == remat.EVENT] == ["measured"]
  assert max(r.get("step", 0) for r in records) == 4
  _run(files["train"], tmp_path / "one", 4, 1, 4, *flags)
  (two_losses, two_grids), (one_losses, one_grids) = (_evals(tmp_path / run)
                                                      for run in ("two", "one"))
  assert sorted(two_losses) == sorted(one_losses) == [3, 4]
  for step, losses in one_losses.items():
    assert two_losses[step] == pytest.approx(losses, rel=1e-5)
  assert sorted(two_grids) == sorted(one_grids) == [2, 4]
  for step, grid in one_grids.items():
    diff = np.abs(two_grids[step].astype(int) - grid)
    assert grid.std() > 0 and diff.max() <= 1 and (diff > 0).mean() < 1e-3, step


# Process 1's first compile of the step ends 35 s after process 0's: longer than the 30 s that
# the CPU collectives (Gloo) wait for a peer while they make their context.
_LATE_COMPILE = """
import os
import sys
import time
from svg_jax.train import dit_task
if os.environ["JAX_PROCESS_ID"] == "1":
  _compile = dit_task.DiTSetup.compile_step
  def compile_step(self, *args):
    print("slowed compile_step", file=sys.stderr, flush=True)
    time.sleep(35)
    return _compile(self, *args)
  dit_task.DiTSetup.compile_step = compile_step
"""


@pytest.mark.slow
def test_a_new_run_waits_for_a_compile_that_ends_35_s_later_on_another_host(data_dir, tmp_path):
  """A fresh run (no checkpoint, whose restore would have agreed first) whose process 1 compiles
  the step 35 s after process 0: both train to the end. Before, the hosts' first collective
  came after the compile, and the CPU collectives' context gave up on the late host after 30 s:
  process 0 ended with a traceback (`Gloo context initialization failed`), process 1 aborted."""
  path = _python_path_with_hook(tmp_path / "late_compile", _LATE_COMPILE)
  errs = _run(data_dir, tmp_path / "run", 2, 2, 2, timeout=300,
              env_of={1: {"PYTHONPATH": path}})
  assert "slowed compile_step" in errs[1], errs[1][-3000:]
  assert [r["event"] for r in _records(tmp_path / "run") if "event" in r][-1] == "finished"


@pytest.mark.slow
def test_a_killed_process_takes_the_other_down(data_dir, tmp_path):
  """SIGKILL to process 1: process 0 exits non-zero instead of hanging, within a bound that
  train.heartbeat_timeout_s sets (15 s here; JAX's default of 100 s would miss the 60 s bound)."""
  code, err = _process_0_after_a_signal_to_process_1(
      data_dir, tmp_path, signal.SIGKILL, 60, "--config.train.heartbeat_timeout_s=15")
  assert code not in (0, None), err[-3000:]
