"""The scripts' shared start (svg_jax/cli.py): XLA's share of a GPU's memory, set before the
backend starts unless the environment chose one; every thread's stack on STACKS_SIGNAL, printed
while threads come and go and while the main thread waits inside XLA."""
import os
import re
import subprocess
import sys
import time

import pytest

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


def _with_stderr_file(tmp_path, script, signal_it, **popen):
  """(process, its stderr, what `signal_it(process)` returned) for `python -c script`; stderr
  goes to a file, as a pipe nobody reads would stop the writer."""
  with open(tmp_path / "stderr", "w+") as log:
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=log,
                            text=True, **popen)
    try:
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
    assert proc.stdout.readline() == "ready\n"
    end, sent = time.monotonic() + 4, 0
    while time.monotonic() < end and proc.poll() is None:
      proc.send_signal(cli.STACKS_SIGNAL)
      sent += 1
    out, _ = proc.communicate("\n", timeout=120)
    return out, sent

  proc, err, (out, sent) = _with_stderr_file(tmp_path, _CHURN, signal_it, stdin=subprocess.PIPE)
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
    assert proc.stdout.readline() == "blocking\n"
    time.sleep(1)
    for _ in range(5):  # the kernel may pick any thread that does not block the signal
      proc.send_signal(cli.STACKS_SIGNAL)
      time.sleep(0.3)
    proc.wait(timeout=120)

  proc, err, _ = _with_stderr_file(tmp_path, _BLOCKED, signal_it,
                                   env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, err[-2000:]
  during = err[:err.index("unblocked")]
  assert during.count("Current thread") == 5, err[-3000:]  # one print for each signal
  assert re.search(r'File "<string>", line \d+ in <module>', during), err[-3000:]
