"""The scripts' shared start (svg_jax/cli.py): XLA's share of a GPU's memory, set before the
backend starts unless the environment chose one; every thread's stack on STACKS_SIGNAL, printed
while threads come and go and while the main thread waits inside XLA; bad flags, configs and input
as one line on stderr and exit status 2 in every script, while a bug keeps its traceback."""
import os
import re
import subprocess
import sys
import threading
import time

import pytest

import script_runs
from svg_jax import cli

_SCRIPT = """
import os
from svg_jax import cli
cli.run(lambda argv: print("fraction", os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")))
"""


def _fraction(**env):
  base = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_MEM_FRACTION"}
  out = subprocess.run([sys.executable, "-c", _SCRIPT], env=dict(base, **env),
                       capture_output=True, text=True, timeout=120, check=True)
  return out.stdout.split("fraction ")[-1].split()[0]


def test_scripts_give_xla_most_of_the_gpu_unless_told_otherwise():
  assert _fraction() == cli.GPU_MEMORY_FRACTION == "0.92"
  assert _fraction(XLA_PYTHON_CLIENT_MEM_FRACTION="0.5") == "0.5"


# Threads start and end while the signals come, as the loader's and checkpointer's threads do.
_CHURN = """
import sys, threading, time
from svg_jax import cli
cli.print_stacks_on_signal()
def nested(n):
  return 0 if n == 0 else nested(n - 1)
def start_and_end_threads():
  while True:
    threads = [threading.Thread(target=nested, args=(50,)) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
for _ in range(2):
  threading.Thread(target=start_and_end_threads, daemon=True).start()
print("ready", flush=True)
sys.stdin.readline()
print("still running", flush=True)
"""


# The children print their first line within ~0.1 s (_CHURN) and ~1 s (_BLOCKED: imports JAX and
# compiles) on 2 busy cores.
READY_TIMEOUT_S = 60


def _first_line(proc, timeout):
  """The child's first line on stdout, or None when none came within `timeout` s (a reader thread
  waits for it, so that a child hanging before it prints cannot hold the test)."""
  lines = []
  reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
  reader.start()
  reader.join(timeout)
  return None if reader.is_alive() else lines[0]


def _with_stderr_file(tmp_path, script, ready, signal_it, **popen):
  """(process, its stderr, what `signal_it(process)` returned) for `python -c script`, called once
  the child has printed the line `ready`; stderr goes to a file, as a pipe nobody reads would stop
  the writer. A child that has not printed it within READY_TIMEOUT_S is killed and fails the
  test."""
  with open(tmp_path / "stderr", "w+") as log:
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=log,
                            text=True, **popen)
    try:
      line = _first_line(proc, READY_TIMEOUT_S)
      if line is None:
        proc.kill()
        proc.wait()
        log.seek(0)
        raise AssertionError(f"the child printed no {ready!r} line within {READY_TIMEOUT_S} s and "
                             f"was killed; its stderr ends:\n{log.read()[-2000:]}")
      assert line == ready, (line, ready)
      result = signal_it(proc)
    finally:
      proc.kill()
    log.seek(0)
    return proc, log.read(), result


@pytest.mark.serial
def test_stacks_on_signal_survive_threads_that_start_and_end(tmp_path):
  """kill -USR1 many times over a process whose threads come and go: it prints stacks and goes
  on. (faulthandler.register's signal-time walk of the threads crashed such a process.)"""
  def signal_it(proc):
    end, sent = time.monotonic() + 4, 0
    while time.monotonic() < end and proc.poll() is None:
      proc.send_signal(cli.STACKS_SIGNAL)
      sent += 1
    out, _ = proc.communicate("\n", timeout=120)
    return out, sent

  proc, err, (out, sent) = _with_stderr_file(tmp_path, _CHURN, "ready\n", signal_it,
                                             stdin=subprocess.PIPE)
  assert proc.returncode == 0, (proc.returncode, sent, err[-2000:])
  assert out == "still running\n"
  assert err.count("(most recent call first)") > 1
  assert 'in start_and_end_threads' in err


# The main thread waits inside XLA for a host callback that takes 6 s (no Python runs in it
# meanwhile); a thread started before the stacks' set-up idles as OpenBLAS's threads do.
_BLOCKED = """
import sys, threading, time
import jax, numpy as np
early = threading.Event()
threading.Thread(target=early.wait, name="started-before", daemon=True).start()
from svg_jax import cli
cli.print_stacks_on_signal()
def slow(x):
  time.sleep(6)
  return x
y = jax.jit(lambda x: jax.pure_callback(slow, jax.ShapeDtypeStruct((), np.float32), x))
y = y.lower(np.float32(1)).compile()
print("blocking", flush=True)
y(np.float32(1)).block_until_ready()
print("unblocked", file=sys.stderr, flush=True)
"""


@pytest.mark.serial
def test_stacks_on_signal_come_while_the_main_thread_waits_inside_xla(tmp_path):
  """Signals while the main thread waits inside XLA: the stacks (its own frame among them) are
  printed during the wait, not after it."""
  def signal_it(proc):
    time.sleep(1)
    for _ in range(5):  # the kernel may pick any thread that does not block the signal
      proc.send_signal(cli.STACKS_SIGNAL)
      time.sleep(0.3)
    proc.wait(timeout=120)

  proc, err, _ = _with_stderr_file(tmp_path, _BLOCKED, "blocking\n", signal_it,
                                   env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, err[-2000:]
  during = err[:err.index("unblocked")]
  assert during.count("Current thread") == 5, err[-3000:]  # one print for each signal
  assert re.search(r'File "<string>", line \d+ in <module>', during), err[-3000:]


# ----------------------------------------------------------------------------- bad input: one line

TINY = os.path.join(script_runs.REPO, "configs", "tiny.py")


@pytest.mark.parametrize("script, args, field, hint", [
    ("train.py", ["--config", TINY, "--workdir=unused", "--config.train.num_step=3"],
     "train.num_step", "num_steps"),
    # The default config file: config_flags reads its overrides when the flag is defined.
    ("precompute.py", ["--input=x", "--out=y", "--config.precompute.resolutoin=64"],
     "precompute.resolutoin", "resolution"),
    ("sample.py", ["--config", TINY, "--config.modl.dim=3"], "modl", "model"),
    ("generate_benchmark.py", ["--config", TINY, "--config.model.n_layer=3"], "model.n_layer",
     "n_layers"),
    ("evaluate.py", ["--config", TINY, "--config.autoencoder.stats_pth=s"],
     "autoencoder.stats_pth", "stats_path"),
    ("describe.py", [f"--config={TINY}", "--config.model.dimension=3"], "model.dimension", None),
    ("convert.py", ["--config", TINY, "--config.model.dimm=3"], "model.dimm", "dim"),
    ("reconstruct.py", ["--config", TINY, "--noconfig.autoencoder.bf16_stat"],
     "autoencoder.bf16_stat", "bf16_stats"),
    ("latent_stats.py", ["--images=x", "--out=y", "--config", TINY,
                         "--config.autoencoder.stats_layr=-1"], "autoencoder.stats_layr",
     "stats_layer"),
])
def test_an_unknown_config_field_is_one_line_naming_it_in_every_script(script, args, field, hint):
  line = script_runs.assert_one_line(script_runs.run(script, *args),
                                     f"config error: unknown config field {field!r}")
  assert (f"(did you mean {hint!r}?)" in line) == (hint is not None), line
  assert f"given as {args[-1].split('=')[0]}" in line


@pytest.mark.parametrize("script, args, message", [
    ("train.py", ["--config", "configs/nope.py", "--workdir=unused"],
     "config error: config file configs/nope.py (--config) does not exist"),
    ("precompute.py", ["--input=x", "--out=y", "--config=configs/nope.py:demo",
                       "--config.precompute.resolution=64"],
     "config error: config file configs/nope.py (--config) does not exist"),
    ("train.py", ["--config", f"{TINY}:huge", "--workdir=unused"],
     "config error: unknown demo preset 'huge'"),
    ("train.py", ["--config", TINY, "--workdir=unused", "--config.task=nope"],
     "config error: task 'nope' is not supported by this trainer (only ('dit', 'decoder'))"),
    ("precompute.py", ["--input=x"], "flag error: flag --out=None: Flag --out must have a value"),
    ("train.py", [], "flag error: flag --config=None: Flag --config must have a value other than "
     "None; flag --workdir=None: Flag --workdir must have a value other than None"),
    ("describe.py", ["--config", TINY, "--config.model.n_kv_heads=3"],
     "input error: invalid NextDiT config: n_heads 4 not a multiple of n_kv_heads 3"),
    ("describe.py", ["--config", TINY, "--config.model.compute_dtype=int32"],
     "input error: invalid NextDiT config: compute_dtype 'int32' not in ('float32', 'bfloat16')"),
    ("describe.py", ["--config", TINY, "--config.model.n_heads=0"],
     "input error: invalid NextDiT config: n_heads must be an integer >= 1, got 0"),
    ("train.py", ["--config", TINY, "--workdir=unused", "--config.model.patch_size=0"],
     "patch_size must be an integer >= 1, got 0"),
    ("precompute.py", ["--input=x", "--out=y", "--config=configs/precompute.py:demo",
                       "--config.precompute.resolution=60"],
     "resolution 60 leaves no aspect-ratio bucket (8-pixel patches, max_ratio 4.0"),
    ("precompute.py", ["--input=x", "--out=y", "--config.precompute.max_ratio=0.5"],
     "; max_ratio must be >= 1, got 0.5"),
    ("sample.py", ["--config", TINY, "--weights=w", "--format=flax", "--text_encoder=t",
                   "--out=o", "--prompt=a", "--grid_cols=-2"],
     "usage error: --grid_cols must be >= 0"),
    ("sample.py", ["--config", TINY, "--weights=w", "--format=flax", "--text_encoder=t",
                   "--out=o", "--prompt=a", "--system_type=bogus"],
     "usage error: unknown system_type 'bogus'"),
    ("sample.py", ["--config", TINY, "--weights=w", "--format=flax", "--text_encoder=t",
                   "--out=o", "--prompt=a", "--batch_size=-1"],
     "usage error: --batch_size must be >= 0, got -1"),
    ("prompt_features.py", ["--text_encoder=t", "--out=o.npz", "--prompts_jsonl=nope.jsonl"],
     "usage error: [Errno 2] No such file or directory: 'nope.jsonl'"),
    ("prompt_features.py", ["--text_encoder=t", "--out=setup.py/o.npz", "--prompt=a"],
     "input error: the folder of --out setup.py cannot be made: "),
    ("prompt_features.py", ["--text_encoder=t", "--out=/tmp", "--prompt=a"],
     "usage error: --out /tmp is a folder; give the .npz file to write"),
    ("profile_summary.py", ["nope"], "input error: no *.xplane.pb trace under nope"),
    ("profile_summary.py", ["--steps=x", "nope"],
     "flag error: flag --steps=x: invalid literal for int() with base 10: 'x'"),
    ("train.py", ["--config", TINY, "--workdir=unused", "--config.model.dim=abc"],
     "flag error: flag --config.model.dim=abc: invalid literal for int() with base 10: 'abc'"),
])
def test_a_bad_config_file_or_flag_is_one_line(script, args, message):
  script_runs.assert_one_line(script_runs.run(script, *args), message)


def test_a_config_file_that_fails_keeps_its_traceback(tmp_path):
  """A bug in a config file is not bad input: its traceback and exit status 1."""
  (tmp_path / "broken.py").write_text("def get_config():\n  return 1 / 0\n")
  out = script_runs.run("train.py", "--config", tmp_path / "broken.py", "--workdir", tmp_path)
  assert out.returncode == 1 and "ZeroDivisionError: division by zero" in out.stderr, out.stderr
  assert "Traceback (most recent call last)" in out.stderr


@pytest.mark.parametrize("script, args", [
    ("precompute.py", ["--input=x", "--out=y"]),
    ("generate_benchmark.py", ["--benchmark=geneval", "--out=y", "--weights=x", "--format=flax",
                               "--text_encoder=t", "--config", TINY]),
])
def test_a_partial_multi_host_environment_is_one_line(script, args):
  """docs/pods.md: a partial set of the explicit variables stops every script that starts the
  distributed runtime with one line, as it stops the trainer."""
  out = script_runs.run(script, *args, env={"JAX_NUM_PROCESSES": "2"})
  script_runs.assert_one_line(out, "multi-host setup error: JAX_NUM_PROCESSES set but "
                              "JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID not")


_RAISES = """
import sys
from absl import app
from svg_jax import cli, input_errors
errors = {"input": input_errors.MissingInput("weights/x.pth does not exist"),
          "usage": app.UsageError("give --prompt"), "bug": ValueError("a bug"),
          "ctrl-c": KeyboardInterrupt()}
def main(argv):
  raise errors[sys.argv[1]]
cli.run(main, interrupted="interrupted (Ctrl-C): rerun to go on")
"""


@pytest.mark.parametrize("kind, status, line", [
    ("input", 2, "input error: weights/x.pth does not exist"),
    ("usage", 2, "usage error: give --prompt"),
    ("ctrl-c", 130, "interrupted (Ctrl-C): rerun to go on"),
    ("bug", 1, None),
])
def test_bad_input_from_main_is_one_line_and_a_bug_keeps_its_traceback(kind, status, line):
  out = subprocess.run([sys.executable, "-c", _RAISES, kind], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  if line is None:
    assert out.returncode == status and "Traceback" in out.stderr, out.stderr[-2000:]
    assert out.stderr.rstrip().endswith("ValueError: a bug")
  else:
    assert script_runs.error_lines(out.stderr) == [line], out.stderr[-2000:]
    assert out.returncode == status


@pytest.fixture(scope="module")
def decoder_files(tmp_path_factory):
  """The demo decoder's files, 6 held-out images, and a copy of their list with a bad line."""
  from configs import decoder as decoder_configs
  from svg_jax.demo import decoder_data
  folder = tmp_path_factory.mktemp("decoder_files")
  paths = decoder_data.prepare_for(decoder_configs.get_config("tiny"), str(folder), num_train=8,
                                   num_heldout=6, seed=0)
  bad = folder / "heldout_bad.jsonl"
  bad.write_text(open(paths["data.heldout_jsonl"]).read() + "{not json\n")
  return paths, str(bad)


@pytest.mark.parametrize("bad_line, message", [
    (False, "heldout.jsonl lists 6 images, fewer than the 64 asked for"),
    (True, "heldout_bad.jsonl:7 is not valid JSON"),
])
def test_decoder_training_on_unusable_images_is_one_line(decoder_files, tmp_path, bad_line,
                                                         message):
  paths, bad = decoder_files
  if bad_line:
    paths = {**paths, "data.heldout_jsonl": bad, "data.num_eval_images": 6}
  out = script_runs.run("train.py", "--config", f"{script_runs.REPO}/configs/decoder.py:tiny",
                        "--workdir", tmp_path, "--config.train.num_steps=1",
                        *[f"--config.{k}={v}" for k, v in paths.items()])
  script_runs.assert_one_line(out, "input error: ", message)


def test_demo_data_into_a_folder_of_another_dataset_is_one_line(tmp_path):
  args = [f"--out={tmp_path}", "--num_heldout=1", "--nodecoder_files"]
  assert script_runs.run("make_demo_data.py", *args, "--num_train=2").returncode == 0
  script_runs.assert_one_line(script_runs.run("make_demo_data.py", *args, "--num_train=3"),
                              f"input error: {tmp_path} already holds a different shapes dataset "
                              "(differs in ['counts']); use another directory or delete it")
