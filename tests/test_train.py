"""The DiT training loop on CPU: mesh equivalence, kill/resume, SIGTERM, NaN stop, bad configs and
a falling loss, on tiny models and synthetic learnable record datasets."""
import asyncio
import functools
import gc
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from orbax.checkpoint._src.path import async_path

import script_runs
from svg_jax import assets
from svg_jax import parallel
from svg_jax.data import records, synthetic
from svg_jax import checkpoint as ckpt_lib
from svg_jax.input_errors import InputError
from svg_jax.utils import writable_folders
from svg_jax.train import dit_task, loop, stall_watch, trainer
from svg_jax.train import flop_count
from svg_jax.train import metrics as metrics_lib

import saved_state
import tiny_trainer
from configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Model dims divisible by every mesh axis used below (fsdp 4 on dim/adaln, tensor 2 on heads/mlp).
MODEL = dict(in_channels=8, cap_feat_dim=16, dim=64, n_heads=4, n_kv_heads=2, axes_dims=(4, 6, 6),
             n_layers=1, n_refiner_layers=1, multiple_of=32)
# The same overrides as command-line flags, for the subprocess tests.
FLAGS = ["--config.model.in_channels=8", "--config.model.cap_feat_dim=16",
         "--config.model.dim=64", "--config.model.n_heads=4", "--config.model.n_kv_heads=2",
         "--config.model.axes_dims=(4,6,6)", "--config.model.n_layers=1",
         "--config.model.n_refiner_layers=1", "--config.model.multiple_of=32",
         "--config.data.caption_len_buckets=(16,)", "--config.data.max_caption_len=16"]


def _dataset(path, buckets=((4, 4),), n=64, seed=0):
  synthetic.write_random_dataset(path, buckets=buckets, num_records=n, latent_channels=8,
                                 text_dim=16, learnable=True, caption_len=(1, 8), seed=seed)
  return str(path)


def _config(data_dir, **train):
  # The mesh tolerances below are for this step size (Adam moves each parameter by ~lr, so
  # rounding differences between meshes scale with it), whatever the demo's DiT is tuned to.
  defaults = dict(global_batch_size=8, lr=5e-4, log_every=1, checkpoint_every=1000,
                  async_checkpointing=True)
  return tiny_trainer.config(data_dir, MODEL, **{**defaults, **train})


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _losses(workdir):
  """step -> loss; a step logged twice (recomputed after a resume) keeps its last value."""
  return {r["step"]: r["loss"] for r in _records(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return _dataset(tmp_path_factory.mktemp("data") / "ds")


@pytest.mark.timeout(60)  # 3.4-4.0 s measured: a Grain worker that hangs fails it early
def test_data_config_sets_the_loaders_threads_and_worker_processes(data_dir):
  """`data.num_workers` / `data.num_threads` reach the trainer's loader: Grain worker processes
  give the batches of the in-process reader, and the state names the worker count it resumes
  under (the thread count leaves no trace in the batches, so its wiring is read directly)."""
  def first_batches(**data):
    config = _config(data_dir)
    config.data.update(data)
    assert dit_task.pipeline_config(config, 8).num_threads == config.data.num_threads
    it = dit_task.make_data_iterator(config)
    try:
      return [next(it) for _ in range(3)], it.get_state()["signature"]["num_workers"]
    finally:
      it.close()

  plain, plain_workers = first_batches()
  pooled, pooled_workers = first_batches(num_workers=2, num_threads=3)
  assert (plain_workers, pooled_workers) == (0, 2)
  for a, b in zip(plain, pooled):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


# ----------------------------------------------------------------------------- 1. meshes


def _run_steps(config, mesh, n):
  setup = dit_task.DiTSetup(config, mesh)
  it = dit_task.make_data_iterator(config)
  out = []
  with parallel.mesh_context(mesh, config.axis_rules):
    state = setup.init_state(config.seed)
    rng = jax.random.PRNGKey(config.seed)
    for step in range(n):
      state, m = setup.step(state, setup.device_batch(next(it)), jax.random.fold_in(rng, step))
      out.append((float(m["loss"]), float(m["grad_norm"])))
    params = jax.device_get(state.params)
  return np.array(out), params


@pytest.fixture(scope="module")
def one_device_run(data_dir):
  config = _config(data_dir, caption_dropout=0.5)  # dropout on: the drop pattern must match too
  config.mesh.update(dict(data=1, fsdp=1, tensor=1))
  return _run_steps(config, parallel.make_mesh(config.mesh, jax.devices()[:1]), 5)


@pytest.mark.parametrize("sizes, micro", [(dict(data=8, fsdp=1, tensor=1), 1),
                                          (dict(data=2, fsdp=4, tensor=1), 1),
                                          (dict(data=2, fsdp=2, tensor=2), 2)])
def test_meshes_give_the_same_losses(data_dir, one_device_run, sizes, micro):
  """Sharded steps equal one-device steps; the (2,2,2) case also accumulates gradients over two
  micro-batches, which must equal one batch (the same noise and t are drawn for the batch)."""
  assert jax.device_count() == 8
  ref, ref_params = one_device_run
  assert np.all(np.isfinite(ref)) and len(set(ref[:, 0])) == 5
  config = _config(data_dir, caption_dropout=0.5, micro_batches=micro)
  config.mesh.update(sizes)
  got, params = _run_steps(config, parallel.make_mesh(sizes), 5)
  dl, dg = np.max(np.abs(got - ref), axis=0)
  print(f"{sizes} micro_batches={micro}: max |loss diff| {dl:.3g}, max |grad norm diff| {dg:.3g}")
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params, ref_params)
  print(f"  max |param diff| after 5 steps {max(jax.tree.leaves(diffs)):.3g}")
  assert max(jax.tree.leaves(diffs)) < 1e-5


# ----------------------------------------------------------------------------- 2./3. processes


NUM_STEPS = 60


def _command(data_dir, workdir, num_steps=NUM_STEPS):
  return [sys.executable, os.path.join(REPO, "launch", "train.py"),
          "--config", os.path.join(REPO, "configs", "tiny.py"), "--workdir", str(workdir),
          f"--config.data.path={data_dir}", f"--config.train.num_steps={num_steps}",
          "--config.train.global_batch_size=8", "--config.train.lr=2e-3",
          "--config.train.warmup_steps=5", "--config.train.log_every=1",
          "--config.train.checkpoint_every=3", "--config.train.keep_checkpoints=2", *FLAGS]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = script_runs.xla_flags(1)  # one compile, one device
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _committed_checkpoints(workdir):
  """Steps whose async save has finished: Orbax writes into a temporary folder and renames it to
  the bare step number when the save is complete."""
  directory = ckpt_lib.checkpoint_dir(str(workdir))
  return [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []


def _wait_for_step(proc, workdir, k, timeout=240, committed=False):
  """Until step k is logged (and, with `committed`, some checkpoint's save has completed)."""
  path = os.path.join(workdir, "metrics.jsonl")
  t0 = time.time()
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      raise AssertionError(f"the run ended (rc {proc.returncode}) before step {k}")
    if (os.path.exists(path) and any(r.get("step", 0) >= k and "loss" in r
                                     for r in _records(workdir))
        and (not committed or _committed_checkpoints(workdir))):
      return
    time.sleep(0.02)
  raise AssertionError(f"no step {k} within {timeout} s")


@pytest.fixture(scope="module")
def reference_workdir(data_dir, tmp_path_factory):
  """An uninterrupted run of launch/train.py (one device)."""
  workdir = tmp_path_factory.mktemp("ref")
  out = subprocess.run(_command(data_dir, workdir), env=_env(), capture_output=True,
                       text=True, timeout=400)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def reference_run(reference_workdir):
  """The reference run's step -> loss."""
  losses = _losses(reference_workdir)
  assert sorted(losses) == list(range(1, NUM_STEPS + 1))
  return losses


@pytest.mark.slow
def test_the_log_times_no_compile_and_names_saves_soon_after_they_commit(reference_workdir):
  """Step 1 (with its compile) is in no throughput figure: its record has none (it was counted
  without its time: 1000+ steps/s). A save is logged once it committed, by the next save at the
  latest (each save waits for the one before): not all at the run's end."""
  records = _records(reference_workdir)
  rows = {r["step"]: i for i, r in enumerate(records) if "loss" in r}
  assert "steps_per_sec" not in records[rows[1]] and "steps_per_sec" in records[rows[2]]
  saved = {r["step"]: i for i, r in enumerate(records) if r.get("event") == "checkpoint"}
  assert sorted(saved) == list(range(3, NUM_STEPS + 1, 3))
  for step, i in saved.items():
    if step + 4 <= NUM_STEPS:
      assert i < rows[step + 4], (step, [records[j] for j in range(i - 5, i + 1)])


@pytest.mark.slow
def test_loss_falls_on_learnable_data(reference_run):
  first = np.mean([reference_run[s] for s in range(1, 11)])
  last = np.mean([reference_run[s] for s in range(NUM_STEPS - 9, NUM_STEPS + 1)])
  print(f"loss: first 10 steps {first:.4f}, last 10 steps {last:.4f}")
  assert last < 0.6 * first


@pytest.mark.slow
def test_sigkill_resume_reproduces_the_losses(data_dir, reference_run, tmp_path):
  k = int(np.random.default_rng().integers(5, 21))
  proc = subprocess.Popen(_command(data_dir, tmp_path), env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    # A kill before the first async save completes rightly restarts from step 0 (no resume to
    # test), so the kill waits for a committed checkpoint as well as for step k.
    _wait_for_step(proc, tmp_path, k, committed=True)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  killed_at = max(_losses(tmp_path))
  assert killed_at < NUM_STEPS, "the run finished before it could be killed"
  out = subprocess.run(_command(data_dir, tmp_path), env=_env(), capture_output=True,
                       text=True, timeout=400)
  assert out.returncode == 0, out.stderr[-3000:]
  resumes = [r for r in _records(tmp_path) if r.get("event") == "resume"]
  assert len(resumes) == 1 and 0 < resumes[0]["step"] <= killed_at
  losses = _losses(tmp_path)
  assert sorted(losses) == list(range(1, NUM_STEPS + 1))
  diff = max(abs(losses[s] - reference_run[s]) for s in losses)
  print(f"killed after step {killed_at}, resumed at {resumes[0]['step']}: max |loss diff| {diff}")
  assert diff <= 1e-6


def test_a_signal_after_the_stop_is_saved_changes_nothing():
  """Once a stop's checkpoint is written, a further SIGTERM (a preemption notice repeated, or
  sent to every host a moment apart) is absorbed on the way out and after it, so the process
  leaves with the stop's exit status. Killed instead, it left the other host aborting in the
  distributed runtime's shutdown (seen as exits -15 and -6 in the multi-host signal test)."""
  flag = loop._StopFlag()  # pylint: disable=protected-access
  before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    flag.install()
    signal.raise_signal(signal.SIGTERM)
    assert flag.signal == "SIGTERM"
    flag.settle()
    signal.raise_signal(signal.SIGTERM)  # unsettled, a second signal raises KeyboardInterrupt
    flag.uninstall()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) == before[signal.SIGINT]
    signal.raise_signal(signal.SIGTERM)  # ignored by the OS: this process lives on
  finally:
    for sig, handler in before.items():
      signal.signal(sig, handler)


def test_an_unsettled_second_signal_still_cuts_the_save_short():
  flag = loop._StopFlag()  # pylint: disable=protected-access
  before = signal.getsignal(signal.SIGTERM)
  try:
    flag.install()
    signal.raise_signal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signal.SIGTERM)
    flag.uninstall()
    assert signal.getsignal(signal.SIGTERM) == before
  finally:
    signal.signal(signal.SIGTERM, before)


@pytest.mark.slow
@pytest.mark.serial
def test_sigusr1_prints_the_stacks_and_sigterm_saves_and_exits_zero(data_dir, tmp_path):
  """SIGUSR1 (cli.STACKS_SIGNAL) writes every thread's stack, the training loop's among them, and
  the run goes on; SIGTERM then saves the step it stops at and exits 0."""
  proc = subprocess.Popen(_command(data_dir, tmp_path), env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for_step(proc, tmp_path, 2)
    proc.send_signal(signal.SIGUSR1)
    _wait_for_step(proc, tmp_path, 4)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-3000:]
  stacks = err[err.index("(most recent call first)"):]
  assert "Current thread" in stacks or "Thread 0x" in stacks, err[-3000:]
  assert re.search(r'File ".*svg_jax/train/loop\.py", line \d+ in train', stacks), err[-3000:]
  assert "SIGTERM received: saved step" in err
  stopped = [r for r in _records(tmp_path) if r.get("event") == "stopped"]
  assert len(stopped) == 1 and stopped[0]["signal"] == "SIGTERM"
  step = stopped[0]["step"]
  assert 4 <= step < NUM_STEPS
  # The checkpoint of the stop step is complete and loadable (here onto an 8-device mesh).
  config = _config(data_dir)
  state, saved = saved_state.restore_state(config, str(tmp_path), parallel.make_mesh(config.mesh))
  assert saved == step and int(state.step) == step


# ----------------------------------------------------------------------------- 4. NaN


def test_nan_loss_stops_without_saving_the_bad_state(data_dir, tmp_path):
  config = _config(data_dir, num_steps=12, checkpoint_every=2, log_every=3, debug_nan_step=6)
  with pytest.raises(loop.TrainingDiverged, match=r"loss is nan at step 6: training stopped "
                     r"without saving this state; the last good checkpoint is step 4") as stopped:
    trainer.train(config, str(tmp_path))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), read_only=True)
  assert ckpt.all_steps() == [2, 4]
  ckpt.close()
  # A watcher of metrics.jsonl sees the run end.
  assert _records(tmp_path)[-1] == {"step": 6, "event": "diverged", "reason": str(stopped.value)}
  # Loadable, finite, and the same values on two other meshes (restore onto a different mesh).
  config.mesh.update(dict(data=2, fsdp=2, tensor=2))
  a, step = saved_state.restore_state(config, str(tmp_path), parallel.make_mesh(config.mesh))
  config.mesh.update(dict(data=1, fsdp=1, tensor=1))
  b, _ = saved_state.restore_state(config, str(tmp_path),
                                  parallel.make_mesh(config.mesh, jax.devices()[:1]))
  assert step == 4 and int(a.step) == 4
  leaves_a, leaves_b = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
  assert all(np.all(np.isfinite(x)) for x in leaves_a)
  assert all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b))
  kernel = a.params["layers_0"]["feed_forward"]["w1"]["kernel"]
  assert len({str(s.index) for s in kernel.addressable_shards}) > 1  # really sharded

  # init_from (next stage): only the params are read; optimizer and EMA start afresh from them.
  config.train.update(dict(debug_nan_step=-1, init_from=str(tmp_path)))
  mesh = parallel.make_mesh(dict(data=2, fsdp=2, tensor=2))
  setup = dit_task.DiTSetup(config, mesh)
  params, loaded_step = ckpt_lib.load_params(str(tmp_path), setup.abstract_state.params,
                                             task="dit")
  assert loaded_step == 4
  with pytest.raises(ckpt_lib.IncompatibleCheckpoint, match=r'^train.init_from: .* is a `task = '
                     r'"dit"` training run, not a "decoder" one$'):  # the decoder's init_from
    ckpt_lib.load_params(str(tmp_path), setup.abstract_state.params, task="decoder")
  assert jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(x, y), jax.device_get(params),
                                   jax.device_get(a.params)))
  fresh = setup.state_from_params(params)
  assert int(fresh.step) == 0
  assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(fresh.ema_params),
                                   jax.device_get(a.params)))
  assert all(not np.any(x) for x in jax.tree.leaves(jax.device_get(fresh.opt_state)))
  wrong = _config(data_dir)
  wrong.model.dim = 32
  wrong.model.axes_dims = (2, 2, 4)
  with pytest.raises(ValueError, match="init_from: the checkpoint's params do not fit this run"):
    ckpt_lib.load_params(str(tmp_path), dit_task.DiTSetup(wrong, mesh).abstract_state.params)
  wrong.train.init_from = str(tmp_path)  # a run of that model: one line, before any step
  with pytest.raises(loop.ConfigError, match=r"^train.init_from: the checkpoint's params do not "
                     r"fit this run: \d+ of \d+ arrays differ \(cap_embedder_linear/bias: "
                     r"checkpoint \(64,\) vs this run \(32,\); "):
    trainer.train(wrong, str(tmp_path / "next_stage"))


class _DataFailsAfter:
  """A loader iterator that gives `n` batches, then fails the way a loader does when its data
  goes (its own error type, raised from the InputError that says what is wrong)."""

  def __init__(self, it, n):
    self._it, self._left = it, n

  def __iter__(self):
    return self

  def __next__(self):
    if not self._left:
      try:
        raise InputError("shard ds/4x4-00000.array_record: file does not exist")
      except InputError as e:
        raise RuntimeError("a reader thread failed") from e
    self._left -= 1
    return next(self._it)

  def __getattr__(self, name):  # the state for checkpoints, close()
    return getattr(self._it, name)


def test_data_that_fails_in_mid_run_is_one_line_naming_the_intact_checkpoints(
    data_dir, tmp_path, monkeypatch):
  make = dit_task.DiTSetup.make_data_iterator
  monkeypatch.setattr(dit_task.DiTSetup, "make_data_iterator",
                      lambda self: _DataFailsAfter(make(self), 3))
  config = _config(data_dir, num_steps=6, checkpoint_every=2)
  with pytest.raises(loop.DataError, match=r"^reading the batch of step 4: shard ds/4x4-00000"
                     r".array_record: file does not exist; the checkpoints up to step 2 are "
                     r"intact: fix the data and rerun the same command to resume$"):
    trainer.train(config, str(tmp_path))
  assert ckpt_lib.Checkpointer(str(tmp_path), read_only=True).all_steps() == [2]


def test_every_row_counts_the_bad_records_the_loader_replaced(data_dir, tmp_path):
  """A record that does not decode is replaced by the next good one (svg_jax/data/pipeline.py);
  every metrics row carries the run's count so far, as the loader state saved with the step."""
  data = shutil.copytree(data_dir, tmp_path / "data")
  with open(data / "manifest.json") as f:
    shard = str(data / json.load(f)["shards"][0]["name"])
  raws = list(records.read_shard(shard))
  with records.ShardWriter(shard) as w:
    for i, raw in enumerate(raws):
      w.write(raw[:len(raw) // 2] if i == 0 else raw)  # record 0 truncated
  work = tmp_path / "run"
  trainer.train(_config(str(data), num_steps=9, checkpoint_every=9), str(work))
  rows = [r for r in _records(work) if "loss" in r]
  with open(work / "checkpoints" / "9" / "data_iter" / "process_0-of-1.json") as f:
    saved = json.load(f)["stats"]["bad_records"]
  assert rows[-1]["step"] == 9 and rows[-1]["bad_records"] == saved >= 1, (saved, rows[-1])
  assert rows[0]["bad_records"] <= rows[-1]["bad_records"]


# ----------------------------------------------------------------------------- damaged checkpoints


def _truncate_data_files(folder):
  """Halves every file of the arrays' data (`d/`): the largest alone was at times a file that
  the state's index no longer refers to (OCDBT keeps superseded data), and the restore passed."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
           if os.path.basename(d) == "d"]
  assert files, f"no OCDBT data files under {folder}"
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _remove(path):
  os.remove(path)


DAMAGES = {
    "truncated_state": lambda step: _truncate_data_files(os.path.join(step, "state")),
    # the arrays' data files, not the metadata: the restore reads every array and fails in them
    "truncated_arrays": lambda step: _truncate_data_files(os.path.join(step, "state",
                                                                       "ocdbt.process_0")),
    "no_manifest": lambda step: _remove(os.path.join(step, "state", "manifest.ocdbt")),
    "no_data_iter": lambda step: _remove(os.path.join(step, "data_iter", "process_0-of-1.json")),
    "truncated_data_iter": lambda step: open(
        os.path.join(step, "data_iter", "process_0-of-1.json"), "w").write('{"format": "sv'),
}


@pytest.fixture(scope="module")
def six_steps(data_dir, tmp_path_factory):
  """An uninterrupted in-process run of 6 steps with checkpoints at 2, 4, 6: step -> loss."""
  workdir = tmp_path_factory.mktemp("six")
  trainer.train(_config(data_dir, num_steps=6, checkpoint_every=2), str(workdir))
  return _losses(workdir)


def _profile_events(workdir):
  return [r for r in _records(workdir) if r.get("event") == "profile"]


def test_a_profile_window_traces_its_steps_and_changes_nothing(data_dir, six_steps, tmp_path):
  """train.profile_steps: steps 3-4 are traced (a profile event, a trace with matmuls in it) and
  the losses are the uninterrupted run's; a window past the last step ends with the run."""
  inside, past = str(tmp_path / "inside"), str(tmp_path / "past")
  trainer.train(_config(data_dir, num_steps=6, checkpoint_every=2, profile_start=2,
                        profile_steps=2), inside)
  (event,) = _profile_events(inside)
  assert (event["first_step"], event["steps"], event["step"]) == (3, 2, 4)
  assert event["path"].startswith(os.path.join(inside, "tensorboard", "plugins", "profile"))
  assert os.path.isfile(event["path"]) and event["ms_per_step"]["matmul"] > 0
  assert _losses(inside) == six_steps
  trainer.train(_config(data_dir, num_steps=6, checkpoint_every=2, profile_start=4,
                        profile_steps=5), past)
  (event,) = _profile_events(past)
  assert (event["first_step"], event["steps"], event["step"]) == (5, 2, 6)
  assert _losses(past) == six_steps


@pytest.mark.parametrize("newest, older", [("truncated_state", "no_manifest"),
                                           ("no_data_iter", "truncated_data_iter"),
                                           ("truncated_arrays", "truncated_state")])
def test_a_damaged_newest_checkpoint_falls_back_to_an_intact_one(data_dir, six_steps, tmp_path,
                                                                  caplog, capfd, monkeypatch,
                                                                  newest, older):
  """Steps 6 and 4 damaged (truncated or missing files): each is named in one line with its
  reason and moved aside (kept), step 2 is restored, and the run goes on with the losses of the
  uninterrupted run; the "checkpoint" events name only saves that committed. The reads that fail
  after the first print nothing (orbax's tasks left running would each print a traceback)."""
  config = _config(data_dir, num_steps=6, checkpoint_every=2)
  trainer.train(config, str(tmp_path))
  directory = ckpt_lib.checkpoint_dir(str(tmp_path))
  DAMAGES[newest](os.path.join(directory, "6"))
  DAMAGES[older](os.path.join(directory, "4"))
  caplog.set_level("ERROR")
  config.train.num_steps = 8
  capfd.readouterr()
  unraisable = []  # an abandoned coroutine's error when it is collected
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  summary = trainer.train(config, str(tmp_path))
  assert summary["resumed_from"] == 2 and summary["step"] == 8
  gc.collect()
  assert not unraisable, f"{len(unraisable)} unraisable, e.g. {unraisable[0].exc_value!r}"
  assert not [r.getMessage() for r in caplog.records if r.name == "asyncio"]  # never retrieved
  err = capfd.readouterr().err
  assert "Traceback" not in err, err[-3000:]  # a callback into a closed loop
  lines = [r.getMessage() for r in caplog.records if "cannot be restored" in r.getMessage()]
  print("\n".join(lines))
  aside = os.path.join(str(tmp_path), ckpt_lib.DAMAGED_SUBDIR)
  assert len(lines) == 2 and all("\n" not in line for line in lines)
  for line, step, nxt in ((lines[0], 6, 4), (lines[1], 4, 2)):
    assert line.startswith(f"checkpoint {os.path.join(directory, str(step))} cannot be restored (")
    assert f"moved to {os.path.join(aside, str(step))}; restoring step {nxt}" in line
  assert sorted(os.listdir(aside)) == ["4", "6"]  # kept, not deleted
  assert sorted(ckpt_lib.Checkpointer(str(tmp_path), read_only=True).all_steps()) == [4, 6, 8]
  losses = _losses(tmp_path)
  assert max(abs(losses[s] - six_steps[s]) for s in six_steps) <= 1e-6
  events = [r["step"] for r in _records(tmp_path) if r.get("event") == "checkpoint"]
  assert events == [2, 4, 6, 4, 6, 8]
  # Each run's first line names its length; one that reached it ends with "finished".
  runs = [r for r in _records(tmp_path) if r.get("event") in ("start", "resume", "finished")]
  assert runs == [{"step": 0, "event": "start", "num_steps": 6}, {"step": 6, "event": "finished"},
                  {"step": 2, "event": "resume", "num_steps": 8}, {"step": 8, "event": "finished"}]
  assert _records(tmp_path)[-1] == {"step": 8, "event": "finished"}


def test_no_intact_checkpoint_and_an_old_loader_state_are_one_line(data_dir, tmp_path):
  config = _config(data_dir, num_steps=2, checkpoint_every=2)
  trainer.train(config, str(tmp_path))
  state_file = os.path.join(ckpt_lib.checkpoint_dir(str(tmp_path)), "2", "data_iter",
                            "process_0-of-1.json")
  with open(state_file) as f:
    state = json.load(f)
  with open(state_file, "w") as f:  # the loader-state format of the per-process loader
    json.dump({**state, "format": "svg_jax.data.pipeline/2"}, f)
  config.train.num_steps = 4
  with pytest.raises(loop.ResumeError, match=r"format.*pipeline/2.*is intact") as info:
    trainer.train(config, str(tmp_path))
  assert "\n" not in str(info.value)
  DAMAGES["no_manifest"](os.path.dirname(os.path.dirname(state_file)))
  with pytest.raises(loop.ResumeError, match="no intact checkpoint in .*damaged_checkpoints") as e:
    trainer.train(config, str(tmp_path))
  assert "\n" not in str(e.value)
  assert os.listdir(os.path.join(str(tmp_path), ckpt_lib.DAMAGED_SUBDIR)) == ["2"]


def _file_hashes(folder):
  """relative path -> sha256 of every file under `folder`."""
  out = {}
  for d, _, names in os.walk(folder):
    for name in names:
      with open(os.path.join(d, name), "rb") as f:
        out[os.path.relpath(os.path.join(d, name), folder)] = hashlib.sha256(f.read()).hexdigest()
  return out


def test_a_checkpoint_of_another_model_is_one_line_and_left_in_place(data_dir, tmp_path):
  """A workdir resumed with another model width or layer count: exit 4 with one line naming a
  leaf that differs (told from the checkpoint's metadata, no orbax tracebacks), every step left
  in place bit for bit; the run's own config then resumes from the newest step. A leaf of
  another dtype is refused as well (a restore would cast it)."""
  config = _config(data_dir, num_steps=4, checkpoint_every=2)
  trainer.train(config, str(tmp_path))
  directory = ckpt_lib.checkpoint_dir(str(tmp_path))
  before = _file_hashes(directory)
  assert sorted(os.listdir(directory)) == ["2", "4"]
  for flags, leaf in (
      (["--config.model.dim=32", "--config.model.axes_dims=(2,2,4)"],
       r"params/cap_embedder_linear/bias: checkpoint \(64,\) float32 vs this run \(32,\) float32"),
      (["--config.model.n_layers=2"],
       r"params/layers_1/\S+: checkpoint absent vs this run \([\d, ]+\) float32")):
    changed = {f.split("=")[0] for f in flags}  # a tuple flag given twice would be joined
    command = [a for a in _command(data_dir, tmp_path, 6) if a.split("=")[0] not in changed]
    out = subprocess.run(command + flags, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 4, out.stderr[-3000:]
    assert not os.path.exists(os.path.join(str(tmp_path), ckpt_lib.DAMAGED_SUBDIR))
    assert _file_hashes(directory) == before
    lines = [l for l in out.stderr.splitlines() if "error" in l.lower()]
    assert len(lines) == 1, lines
    assert re.match(r"resume error: the arrays of step 4 do not fit this run: \d+ of \d+ arrays "
                    r"differ \(" + leaf, lines[0]), lines[0]
    assert (f"the checkpoint {os.path.join(directory, '4')} is intact and was left in place"
            in lines[0])
    assert "Traceback" not in out.stderr and "never retrieved" not in out.stderr
  setup = dit_task.DiTSetup(config, parallel.make_mesh(config.mesh))
  step = setup.abstract_state.step
  other_dtype = setup.abstract_state.replace(
      step=jax.ShapeDtypeStruct(step.shape, np.float32, sharding=step.sharding))
  with pytest.raises(ckpt_lib.IncompatibleCheckpoint, match=r"^the arrays of step 4 do not fit "
                     r"this run: 1 of \d+ arrays differ \(step: checkpoint \(\) int32 vs this run "
                     r"\(\) float32\)$"):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), read_only=True)
    try:
      ckpt.restore(4, other_dtype)
    finally:
      ckpt.close()
  config.train.num_steps = 6
  assert trainer.train(config, str(tmp_path))["resumed_from"] == 4


def _failing_restores(monkeypatch, errors):
  """Checkpointer.restore raises `errors` one by one, then restores as usual."""
  real, pending = ckpt_lib.Checkpointer.restore, list(errors)

  def restore(self, *args, **kwargs):
    if pending:
      raise pending.pop(0)
    return real(self, *args, **kwargs)

  monkeypatch.setattr(ckpt_lib.Checkpointer, "restore", restore)


def test_a_restore_that_fails_once_is_read_again_not_moved(data_dir, six_steps, tmp_path,
                                                            monkeypatch):
  """A passing read error (a network filesystem's) costs one more read of the same step (and a
  "restore_retry" event), not the step."""
  config = _config(data_dir, num_steps=4, checkpoint_every=2)
  trainer.train(config, str(tmp_path))
  _failing_restores(monkeypatch, [OSError("Connection reset by peer")])
  config.train.num_steps = 6
  assert trainer.train(config, str(tmp_path))["resumed_from"] == 4
  retries = [r for r in _records(tmp_path) if r.get("event") == "restore_retry"]
  assert [(r["step"], r["reason"]) for r in retries] == [(4, "OSError: Connection reset by peer")]
  assert not os.path.exists(os.path.join(str(tmp_path), ckpt_lib.DAMAGED_SUBDIR))
  losses = _losses(tmp_path)
  assert max(abs(losses[s] - six_steps[s]) for s in six_steps) <= 1e-6


def _slow_compiles(monkeypatch, seconds, shapes_seen):
  """The DiT's state init, and each compile of its step (once for each batch shape), take
  `seconds` more, as long compiles would; the compiled batch shapes go to `shapes_seen`."""
  real_compile, real_init_state = dit_task.DiTSetup.compile_step, dit_task.DiTSetup.init_state

  def compile_step(self, state, batch, rng):
    shapes_seen.append({k: v.shape for k, v in batch.items()})
    time.sleep(seconds)
    return real_compile(self, state, batch, rng)

  def init_state(self, seed):
    time.sleep(seconds)
    return real_init_state(self, seed)

  monkeypatch.setattr(dit_task.DiTSetup, "compile_step", compile_step)
  monkeypatch.setattr(dit_task.DiTSetup, "init_state", init_state)


@pytest.mark.serial
def test_the_stall_watch_times_a_hung_restore_and_not_the_compiles(tmp_path, monkeypatch):
  """A 2 s watch (its action recorded, not exit 7). Latents in two aspect buckets, no saves: an
  init and the step calls that compile (the first batch of each bucket) take 3 s each, as long
  compiles do, and pass. A restore that hangs fires the watch once, naming the checkpoint, and
  the run resumes once it is released."""
  fired, released, shapes_seen, last_events = [], threading.Event(), [], []

  def on_stall(line):
    fired.append(line)
    last_events.append(_records(workdir)[-1])  # what the exit 7 that comes here would leave
    released.set()

  monkeypatch.setattr(stall_watch, "StallWatch",
                      functools.partial(stall_watch.StallWatch, on_stall=on_stall))
  data_dir = _dataset(tmp_path / "ds", buckets=((4, 4), (2, 4)), n=[32, 32])
  config = _config(data_dir, num_steps=8, checkpoint_every=0, stall_timeout_s=2)
  with monkeypatch.context() as slow:
    _slow_compiles(slow, 3.0, shapes_seen)
    trainer.train(config, str(tmp_path / "compiles"))
  assert len(shapes_seen) == 2, shapes_seen  # one compile for each bucket, one in mid-run
  assert not fired
  # The run that writes the checkpoint has the watch off: its first save compiles orbax's
  # slicing of each array, which a cold cache makes slower than 2 s here.
  workdir = str(tmp_path / "restore")
  config = _config(data_dir, num_steps=4, checkpoint_every=4, stall_timeout_s=0)
  trainer.train(config, workdir)
  real_restore = ckpt_lib.Checkpointer.restore

  def hung_restore(self, *args, **kwargs):
    released.wait(60)
    return real_restore(self, *args, **kwargs)

  monkeypatch.setattr(ckpt_lib.Checkpointer, "restore", hung_restore)
  config.train.update(num_steps=5, stall_timeout_s=2)
  summary = trainer.train(config, workdir)
  assert (summary["resumed_from"], summary["step"]) == (4, 5)
  assert fired == [
      "stalled: restoring checkpoint 4 (its files and every host's agreement) took over 2 s "
      "(train.stall_timeout_s); every thread's stack is above. Rerun the same command to resume "
      f"from the newest checkpoint in {ckpt_lib.checkpoint_dir(workdir)}"]
  assert last_events == [{
      "step": 0, "event": "stalled", "timeout_s": 2.0,
      "waiting_for": "restoring checkpoint 4 (its files and every host's agreement)"}]


@pytest.mark.parametrize("error", [
    MemoryError(),
    jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4.2G"),
], ids=["host", "device"])
def test_a_restore_out_of_memory_leaves_the_checkpoint_in_place(data_dir, tmp_path, monkeypatch,
                                                                error):
  config = _config(data_dir, num_steps=2, checkpoint_every=2)
  trainer.train(config, str(tmp_path))
  _failing_restores(monkeypatch, [error])
  config.train.num_steps = 4
  with pytest.raises(loop.ResumeError, match=r"restoring .*/2 ran out of memory \(.*Error") as e:
    trainer.train(config, str(tmp_path))
  assert "\n" not in str(e.value) and "left in place" in str(e.value)
  assert ckpt_lib.Checkpointer(str(tmp_path), read_only=True).all_steps() == [2]
  assert not os.path.exists(os.path.join(str(tmp_path), ckpt_lib.DAMAGED_SUBDIR))


def _saves_that_fail(monkeypatch, where):
  """The run's second checkpoint save fails: when it starts ("at save"), or in its background
  write ("in the background": nothing is written, and the next wait for the save raises)."""
  real_save, real_wait = ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished
  saves, failed = [], []

  def save(self, *args, **kwargs):
    saves.append(1)
    if len(saves) != 2:
      return real_save(self, *args, **kwargs)
    error = OSError(28, "No space left on device")
    if where == "at save":
      raise error
    failed.append(error)
    return True

  def wait(self):
    if failed:
      raise failed.pop()
    return real_wait(self)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", wait)


def _reports_of_a_failed_write_task(folder: str, caplog, write=None) -> list[str]:
  """What asyncio logs of a write task into `folder` (or of the coroutine `write`) whose error
  nobody retrieved, as orbax leaves them behind a failed save (one per array, logged when the
  task is collected)."""
  async def write_array():
    raise ValueError(f'Error writing "params/0" at local file "{folder}/4.orbax-checkpoint-tmp"')

  caplog.clear()
  event_loop = asyncio.new_event_loop()
  task = event_loop.create_task(write() if write else write_array())
  event_loop.run_until_complete(asyncio.sleep(0.01))
  event_loop.close()
  del task
  gc.collect()
  return [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]


@pytest.mark.parametrize("where", ["at save", "in the background"])
def test_a_checkpoint_that_cannot_be_written_stops_the_run_in_one_line(data_dir, six_steps,
                                                                       tmp_path, monkeypatch,
                                                                       where, caplog):
  """The save of step 4 fails (a full disk): CheckpointError names the step, the reason and step
  2 as the newest intact one; a rerun resumes from step 2 with the uninterrupted run's losses.
  The write tasks that failed with it are not reported again at exit (after the run's line)."""
  config = _config(data_dir, num_steps=6, checkpoint_every=2)
  _saves_that_fail(monkeypatch, where)
  with pytest.raises(loop.CheckpointError) as e:
    trainer.train(config, str(tmp_path))
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"writing checkpoint 4 to {ckpt_lib.checkpoint_dir(str(tmp_path))} "
                            "failed (OSError: [Errno 28] No space left on device); the checkpoints "
                            "up to step 2 are intact: make the checkpoint folder writable"), message
  folder = ckpt_lib.checkpoint_dir(str(tmp_path))
  assert not _reports_of_a_failed_write_task(folder, caplog)
  assert _reports_of_a_failed_write_task(str(tmp_path / "another_run"), caplog)  # only this save's
  # Orbax's own writes (its metadata) fail with errors that name no folder: FileNotFoundError(2,
  # 'No such file or directory') here, OSError(27, 'File too large') on a full disk.
  missing = epath.Path(tmp_path / "missing" / "_sharding")
  assert not _reports_of_a_failed_write_task(
      folder, caplog, write=lambda: async_path.write_text(missing, "{}"))
  monkeypatch.undo()
  assert ckpt_lib.Checkpointer(str(tmp_path), read_only=True).all_steps() == [2]
  assert trainer.train(config, str(tmp_path))["resumed_from"] == 2
  losses = _losses(tmp_path)
  assert max(abs(losses[s] - six_steps[s]) for s in six_steps) <= 1e-6


def test_a_full_disk_leaves_the_run_s_line_last_and_orbax_s_tracebacks_in_a_file(data_dir,
                                                                                 tmp_path):
  """launch/train.py whose files may not exceed 16 KiB (`ulimit -f`: the writes of checkpoint 3
  fail mid-file as on a full disk). stderr ends with the run's one line; orbax's errors are one
  line each, their tracebacks in the workdir's orbax_errors.0.log; none of asyncio's or
  Python's reports of the failed writes (hundreds of tracebacks without the filters) remain."""
  command = ["bash", "-c", 'ulimit -f 16 && exec "$@"', "bash", *_command(data_dir, tmp_path, 4)]
  env = dict(_env(), JAX_ENABLE_COMPILATION_CACHE="false")  # its entries are larger than 16 KiB
  out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 6, out.stderr[-3000:]
  ours = [line for line in out.stderr.splitlines() if line.startswith("checkpoint error")]
  assert len(ours) == 1 and ours[0].startswith(
      f"checkpoint error: writing checkpoint 3 to {ckpt_lib.checkpoint_dir(str(tmp_path))} "
      "failed ("), out.stderr[-3000:]
  assert "failed (File too large [errno 27]; ValueError: " in ours[0], ours[0]
  assert "no earlier checkpoint was written" in ours[0]
  assert out.stderr.rstrip().splitlines()[-1] == ours[0], out.stderr[-3000:]
  for noise in ("Traceback", "Event loop is closed", "never retrieved", "never awaited"):
    assert noise not in out.stderr, (noise, out.stderr[-3000:])
  orbax_lines = [line for line in out.stderr.splitlines() if "[orbax error; in full in" in line]
  assert orbax_lines, out.stderr[-3000:]
  with open(tmp_path / "orbax_errors.0.log") as f:
    assert "Traceback" in f.read()


def _steps_that_run_out_of_memory_after(monkeypatch, n):
  """The DiT's compiled step, but its call n + 1 meets XLA's own out-of-memory error: it allocates
  16 TiB."""
  real_compile, calls = dit_task.DiTSetup.compile_step, []

  def compile_step(self, *args):
    real_step = real_compile(self, *args)

    def step(*step_args):
      calls.append(1)
      if len(calls) > n:
        jax.jit(lambda: jax.numpy.ones((2**20, 2**22), np.float32))().block_until_ready()
      return real_step(*step_args)
    return step

  monkeypatch.setattr(dit_task.DiTSetup, "compile_step", compile_step)


def test_a_step_out_of_memory_is_one_line_and_the_checkpoints_resume(data_dir, six_steps,
                                                                     tmp_path, monkeypatch):
  """A step that does not fit ends the run with `OutOfMemory` (one line naming the last step done,
  XLA's reason and what to change); the checkpoint before it resumes the uninterrupted run."""
  config = _config(data_dir, num_steps=6, checkpoint_every=2)
  _steps_that_run_out_of_memory_after(monkeypatch, 3)
  with pytest.raises(loop.OutOfMemory, match=r"^after step 3: .*Out of memory allocating "
                     r"17592186044416 bytes.*checkpoints in .* are intact") as e:
    trainer.train(config, str(tmp_path))
  assert "\n" not in str(e.value) and "model.remat_policy" in str(e.value)
  assert ckpt_lib.Checkpointer(str(tmp_path), read_only=True).all_steps() == [2]
  monkeypatch.undo()
  assert trainer.train(config, str(tmp_path))["resumed_from"] == 2
  losses = _losses(tmp_path)
  assert max(abs(losses[s] - six_steps[s]) for s in six_steps) <= 1e-6


# ----------------------------------------------------------------------------- 5. bad configs


@pytest.mark.parametrize("change, message", [
    (lambda c: c.mesh.update(dict(data=3, fsdp=1, tensor=1)),
     "needs 3 devices but this run has 8"),
    (lambda c: c.train.update(dict(global_batch_size=12)),
     "micro batch 12 .* is not divisible by the 8 batch shards"),
    (lambda c: c.train.update(dict(global_batch_size=16, micro_batches=3)),
     "global_batch_size 16 is not divisible by train.micro_batches 3"),
    (lambda c: c.data.update(dict(path="/nonexistent/data")),
     "data.path '/nonexistent/data' does not exist"),
    (lambda c: c.model.update(dict(cap_feat_dim=32)),
     "text features have dim 16 but model.cap_feat_dim is 32"),
    (lambda c: c.model.update(dict(patch_size=4)),
     r"model.dim 64 is below the patch's 128 input dimensions "
     r"\(in_channels 8 x patch_size\^2 16\)"),
    (lambda c: c.train.update(dict(lr=-1.0)), r"train.lr must be > 0, got -1.0"),
    (lambda c: c.train.update(dict(b2=1.0)), r"train.b2 must be in \[0, 1\), got 1.0"),
    (lambda c: c.train.update(dict(ema_decay=1.0)), r"train.ema_decay must be in \[0, 1\)"),
    (lambda c: c.train.update(dict(grad_clip=-2.0)), r"train.grad_clip must be >= 0"),
    (lambda c: c.train.update(dict(stall_timeout_s=-1)),
     r"train.stall_timeout_s must be >= 0 \(0 turns the watch off\), got -1"),
    (lambda c: c.train.update(dict(lr_schedule="warmup_cosine", warmup_steps=100,
                                   num_steps=50)),
     r"train.warmup_steps 100 must be below train.num_steps 50"),
    (lambda c: c.flow.update(dict(logit_std=0.0)), r"flow.logit_std must be > 0"),
    (lambda c: c.train.update(dict(lr_end=0.5)), r"train.lr_end must be in \[0, train.lr\]"),
    (lambda c: c.train.update(dict(profile_steps=2, profile_start=0)),
     r"train.profile_steps must be >= 0 and train.profile_start >= 1 \(step 1 compiles\)"),
])
def test_bad_config_fails_with_one_line_before_compiling(data_dir, tmp_path, monkeypatch, change,
                                                         message):
  config = _config(data_dir)
  change(config)

  def no_compile(*args, **kwargs):
    raise AssertionError("compiled before the config was checked")

  monkeypatch.setattr(loop.jax, "jit", no_compile)
  monkeypatch.setattr(loop.jax, "eval_shape", no_compile)
  with pytest.raises(loop.ConfigError, match=message) as info:
    trainer.train(config, str(tmp_path))
  assert "\n" not in str(info.value)


@pytest.mark.slow
def test_a_run_with_loader_workers_ends_without_leaking_their_shared_memory(data_dir, tmp_path):
  """Grain's worker processes hand batches over in shared memory, which Grain unlinks in a
  background thread; a run that ended right after its last batch left that work to
  multiprocessing's resource tracker, which warned of leaked shared_memory objects."""
  out = subprocess.run(_command(data_dir, tmp_path, 4) + ["--config.data.num_workers=2"],
                       env=_env(), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "leaked shared_memory" not in out.stderr, out.stderr[-2000:]


def test_a_negative_lr_is_one_line_and_exit_2_on_the_command_line(data_dir, tmp_path):
  out = subprocess.run(_command(data_dir, tmp_path, 2) + ["--config.train.lr=-1"], env=_env(),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if "config error" in l]
  assert len(lines) == 1 and "train.lr must be > 0, got -1" in lines[0]
  assert "Traceback" not in out.stderr
  assert not os.path.exists(os.path.join(tmp_path, "metrics.jsonl"))


def test_unknown_field_fails_on_the_command_line(data_dir, tmp_path):
  cmd = _command(data_dir, tmp_path, 2) + ["--config.train.lerning_rate=1e-3"]
  out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert lines == [lines[0]] and lines[0].startswith(
      "config error: unknown config field 'train.lerning_rate'")
  assert "given as --config.train.lerning_rate" in lines[0]
  assert not os.path.exists(os.path.join(tmp_path, "metrics.jsonl"))


# ----------------------------------------------------------------------------- FLOPs


def test_flop_count_matches_xla_cost_analysis():
  """The analytic forward FLOPs agree with XLA's count of the compiled forward (fp32, 1 device)."""
  from svg_jax import config as config_lib
  from svg_jax.models.nextdit import NextDiT
  c = tiny.get_config()
  c.model.update(MODEL)
  cfg = config_lib.nextdit_config(c)
  model = NextDiT(cfg)
  b, h, w, lc = 2, 4, 6, 16
  args = (np.zeros((b, h, w, 8), np.float32), np.zeros((b,), np.float32),
          np.zeros((b, lc, 16), np.float32), np.ones((b, lc), bool))
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args))
  fwd = jax.jit(model.apply).lower(params, *args).compile().cost_analysis()
  fwd = fwd[0] if isinstance(fwd, list) else fwd
  ours = flop_count.dit_train_flops(cfg, b, (h, w), lc) / 3
  # XLA also counts elementwise work (norms, RoPE, softmax), so it is a little higher.
  print(f"analytic forward FLOPs / XLA's: {ours / fwd['flops']:.3f}")
  assert 0.8 * fwd["flops"] < ours <= 1.05 * fwd["flops"], (ours, fwd["flops"])


def test_gemma2_flop_count_matches_xla_cost_analysis():
  """The online text encoder's analytic forward FLOPs against XLA's count (fp32, 1 device)."""
  from svg_jax.models.gemma2 import Gemma2Config, Gemma2Encoder
  cfg = Gemma2Config(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                     head_dim=8, intermediate_size=96, sliding_window=8)
  b, length = 2, 24
  args = (np.zeros((b, length), np.int32), np.ones((b, length), bool))
  model = Gemma2Encoder(cfg)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args))
  fwd = jax.jit(model.apply).lower(params, *args).compile().cost_analysis()
  fwd = fwd[0] if isinstance(fwd, list) else fwd
  ours = flop_count.gemma2_forward_flops(cfg, b, length)
  print(f"analytic Gemma-2 forward FLOPs / XLA's: {ours / fwd['flops']:.3f}")
  assert 0.8 * fwd["flops"] < ours <= 1.05 * fwd["flops"], (ours, fwd["flops"])
  # Only the layers up to hidden_states[-2] run: one fewer than the model has.
  assert cfg.layers_needed == 2


# ----------------------------------------------------------------------------- pieces


def test_caption_dropout_uses_the_empty_prompt():
  from svg_jax.train import dit_step
  rng = np.random.default_rng(0)
  text = rng.standard_normal((6, 5, 4)).astype(np.float32)
  mask = np.arange(5)[None] < np.array([5, 3, 1, 2, 4, 5])[:, None]
  empty = rng.standard_normal((2, 4)).astype(np.float32)
  key = jax.random.PRNGKey(0)
  t1, m1, d1 = dit_step.apply_caption_dropout(key, text, mask, empty, 1.0)
  assert np.all(np.asarray(d1))
  np.testing.assert_array_equal(np.asarray(m1), np.broadcast_to(np.arange(5) < 2, (6, 5)))
  np.testing.assert_array_equal(np.asarray(t1)[:, :2], np.broadcast_to(empty, (6, 2, 4)))
  assert not np.any(np.asarray(t1)[:, 2:])
  t0, m0, d0 = dit_step.apply_caption_dropout(key, text, mask, empty, 0.0)
  assert not np.any(np.asarray(d0))
  np.testing.assert_array_equal(np.asarray(t0), text)
  np.testing.assert_array_equal(np.asarray(m0), mask)
  with pytest.raises(ValueError, match="the empty prompt has 6 tokens but the caption is padded"):
    dit_step.apply_caption_dropout(key, text, mask, np.zeros((6, 4), np.float32), 0.5)


def test_empty_text_from_the_dataset_folder(data_dir, tmp_path):
  config = _config(data_dir)
  stand_in = dit_task.load_empty_text(config)  # no empty_text.npy in a synthetic dataset
  assert stand_in.shape == (1, 16) and abs(np.sqrt(np.mean(stand_in ** 2)) - 1) < 1e-6
  np.testing.assert_array_equal(stand_in, dit_task.load_empty_text(config))
  feats = np.arange(32, dtype=np.float32).reshape(2, 16)
  np.save(tmp_path / "bos.npy", feats)
  config.data.empty_text = str(tmp_path / "bos.npy")
  np.testing.assert_array_equal(dit_task.load_empty_text(config), feats)
  np.save(tmp_path / "bad.npy", np.zeros((2, 8), np.float32))
  config.data.empty_text = str(tmp_path / "bad.npy")
  with pytest.raises(loop.ConfigError, match="data.empty_text has dim 8, model.cap_feat_dim is 16"):
    trainer.validate_config(config)


def test_dropped_captions_keep_gradients_in_scale(data_dir):
  """Every caption dropped (the empty-prompt stand-in everywhere) against none dropped: the gradient
  norms stay of one order. With an all-zero stand-in token the third step's was 1.3e4 against 1.5
  (the caption stream sits at the embedder's bias, and RMSNorm's gradient goes as 1 / rms)."""
  norms = {}
  for prob in (0.0, 1.0):
    config = _config(data_dir, caption_dropout=prob, warmup_steps=0, lr=2e-3)
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    losses_and_norms, _ = _run_steps(config, parallel.make_mesh(config.mesh, jax.devices()[:1]), 4)
    norms[prob] = losses_and_norms[:, 1]
  print("grad norms, no caption dropped:", norms[0.0], "every caption dropped:", norms[1.0])
  assert np.all(norms[1.0] < 5 * np.max(norms[0.0]))


def test_lr_schedules():
  from svg_jax.train import state as state_lib
  c = tiny.get_config().train
  c.update(dict(lr=1e-3, warmup_steps=10, num_steps=110, lr_schedule="constant"))
  assert float(state_lib.lr_schedule(c)(0)) == pytest.approx(1e-3)
  c.lr_schedule = "warmup_constant"
  f = state_lib.lr_schedule(c)
  assert [float(f(s)) for s in (0, 5, 10, 100)] == pytest.approx([0, 5e-4, 1e-3, 1e-3])
  c.lr_schedule = "warmup_cosine"
  f = state_lib.lr_schedule(c)
  # Half way through the 100 decay steps the cosine is at half the peak; it ends at 0.
  assert [float(f(s)) for s in (5, 10, 60, 110)] == pytest.approx([5e-4, 1e-3, 5e-4, 0],
                                                                    abs=1e-9)
  c.lr_end = 1e-4  # the cosine runs from the peak to lr_end: half way it is their mean
  f = state_lib.lr_schedule(c)
  assert [float(f(s)) for s in (10, 60, 110)] == pytest.approx([1e-3, 5.5e-4, 1e-4], abs=1e-9)


def test_data_from_other_statistics_is_refused(tmp_path):
  """The trainer checks the dataset's fingerprints against the statistics its config names."""
  stats = assets.OFFICIAL_LATENT_STATS
  path = str(tmp_path / "data")
  synthetic.write_random_dataset(path, buckets=((4, 4),), num_records=16, latent_channels=8,
                                 text_dim=16, fingerprints={"statistics": "sha256:0000:row11"})
  config = _config(path)
  config.autoencoder.stats_path = stats
  with pytest.raises(records.FingerprintMismatchError, match="statistics"):
    dit_task.make_data_iterator(config)
  # The config check finds it first, before the train state is built.
  assert [p for p in dit_task.config_problems(config, 1)
          if p.startswith("data.path: dataset fingerprints do not match") and "statistics" in p]
  config.autoencoder.stats_path = ""  # nothing named, nothing to check
  dit_task.make_data_iterator(config).close()
  assert not [p for p in dit_task.config_problems(config, 1) if "fingerprints" in p]


def test_metric_accumulation_stays_off_the_mesh(tmp_path):
  """Inside the run's mesh, the logger's clu math (a few tiny ops a metric) makes arrays
  on this host's CPU device. Arrays replicated over the mesh would make each op a program
  launched on every device of every host, queued behind the step: 2-process CPU runs hung there
  (docs/design_notes.md)."""
  mesh = parallel.make_mesh(dict(data=-1, fsdp=1, tensor=1))  # the run's mesh, as the loop makes it
  logger = metrics_lib.MetricsLogger(str(tmp_path), num_steps=2, num_devices=mesh.size,
                                     is_main=False)
  host = {"loss": np.float32(0.5), "grad_norm": np.float32(1.0), "caption_dropped": np.float32(0),
          "lr": np.float32(1e-3)}
  before = jax.live_arrays()  # held, so that no new array can take the id of one of these
  known = {id(a) for a in before}
  with parallel.use_mesh(mesh):
    for _ in range(2):
      logger.add(host, images=8, tokens=64, flops=1.0)
    made = [a for a in jax.live_arrays() if id(a) not in known]  # the accumulated metrics
    record = logger.write(2)
  assert mesh.size > 1 and made
  cpu = jax.local_devices(backend="cpu")[0]
  assert all(a.sharding.device_set == {cpu} for a in made), {str(a.sharding) for a in made}
  assert record["loss"] == 0.5 and record["grad_norm"] == 1.0


def test_the_eta_is_from_the_mean_rate_a_slow_window_does_not_swing(tmp_path, monkeypatch):
  """Windows of 10 steps in 1 s, then one with a 9 s checkpoint save in it: that window's steps/s
  falls tenfold, the ETA follows the mean since the clock restarted (30 steps in 12 s), not it;
  a step run before the restart (with its compile) counts in neither."""
  now = [100.0]
  monkeypatch.setattr(metrics_lib, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
  logger = metrics_lib.MetricsLogger(str(tmp_path), num_steps=1000, num_devices=1, chip="cpu",
                                     is_main=False)
  host = {"loss": np.float32(0.5), "grad_norm": np.float32(1.0), "caption_dropped": np.float32(0),
          "lr": np.float32(1e-3)}
  logger.add(host, images=8, tokens=64, flops=1.0, timed=False)  # step 1, with its compile
  now[0] += 60
  logger.restart_clock()
  records = []
  for window, seconds in enumerate((1, 1, 10, 1)):
    for _ in range(10):
      logger.add(host, images=8, tokens=64, flops=1.0)
    now[0] += seconds
    records.append(logger.write(1 + 10 * (window + 1)))
  assert [r["steps_per_sec"] for r in records] == pytest.approx([10, 10, 1, 10])
  assert records[1]["eta_sec"] == pytest.approx((1000 - 21) / 10)
  assert records[2]["eta_sec"] == pytest.approx((1000 - 31) * 12 / 30)
  assert records[3]["eta_sec"] == pytest.approx((1000 - 41) * 13 / 40)
  assert "ETA 0:05:12" in logger.progress_line(records[3])


def test_a_workdir_that_cannot_be_written_or_a_truncated_shard_stops_before_any_step(data_dir,
                                                                                      tmp_path):
  """One line (an input error: exit 2 in the scripts) before the first step, not a traceback or
  an orbax wait at the first save."""
  import shutil

  from svg_jax.input_errors import InputError
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "checkpoints").write_text("not a folder")
  with pytest.raises(writable_folders.FolderNotWritable,
                     match=r"^the checkpoint folder \S+/checkpoints "
                     r"cannot be made: File exists$"):
    trainer.train(_config(data_dir, num_steps=4, checkpoint_every=2), str(workdir))
  assert sorted(os.listdir(workdir)) == ["checkpoints"]  # nothing trained, nothing written
  bad = tmp_path / "truncated"
  shutil.copytree(data_dir, bad)
  shard = sorted(bad.glob("*.array_record"))[0]
  shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
  with pytest.raises(InputError, match=rf"shard {shard}: not a readable ArrayRecord"):
    trainer.train(_config(str(bad), num_steps=4), str(tmp_path / "run2"))
  assert not [r for r in _records(str(tmp_path / "run2")) if "loss" in r]  # no step was taken
