"""Several hosts on one machine: local processes under JAX's distributed runtime, started by the
explicit JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set, each with a reader of
its stderr, and a wait whose hang fails with every process's stacks instead of blocking the
suite."""
import os
import socket
import subprocess
import threading
import time

from svg_jax import cli


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def host_env(env: dict, port: int, processes: int, index: int) -> dict:
  """`env` with the explicit set that makes this process host `index` of `processes`."""
  if "PYTEST_XDIST_WORKER" in os.environ:  # beside another worker, heartbeats become a coin toss
    raise RuntimeError("a test that starts several hosts runs alone, not on a pytest-xdist worker: "
                       "mark it @pytest.mark.serial and run those without -n (launch/test.sh does)")
  return dict(env, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes),
              JAX_PROCESS_ID=str(index))


def popen(command, env):
  """A process whose stderr a thread reads from the start: a pipe that nobody reads blocks the
  process once it is full, short of the collective its peers wait in, and the run hangs on the
  test's reading order (while the test polls metrics.jsonl, or reads another process first)."""
  p = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True)
  p.err_chunks = []
  p.reader = threading.Thread(target=lambda: p.err_chunks.append(p.stderr.read()), daemon=True)
  p.reader.start()
  return p


def wait(procs, timeout, exit_times=None):
  """(return codes, stderr texts) once all have exited; a hang fails within `timeout` seconds
  with the end of every process's log, where each process that still runs has printed its
  threads' stacks (cli.STACKS_SIGNAL) before it is killed. A list `exit_times` receives each
  process's exit time (time.monotonic(), polled every 0.05 s)."""
  deadline = time.monotonic() + timeout
  hung = False
  try:
    if exit_times is not None:  # polled, not waited for in order: a later process may end first
      ended = {}
      while len(ended) < len(procs) and time.monotonic() < deadline:
        for i, p in enumerate(procs):
          if i not in ended and p.poll() is not None:
            ended[i] = time.monotonic()
        time.sleep(0.05)
      exit_times[:] = [ended.get(i) for i in range(len(procs))]
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
    for p in procs:  # the pipe closes when the process and its loader workers are gone
      p.reader.join(max(deadline - time.monotonic(), 1))
    hung = any(p.reader.is_alive() for p in procs)
  except subprocess.TimeoutExpired:
    hung = True
  finally:
    if hung:
      for p in procs:
        if p.poll() is None:
          p.send_signal(cli.STACKS_SIGNAL)
      time.sleep(3)
    for p in procs:
      p.kill()
  errs = []
  for p in procs:
    p.reader.join(30)
    errs.append("".join(p.err_chunks))
  if hung:
    tails = [f"process {i} (exit {p.returncode}):\n" + err[-8000:]
             for i, (p, err) in enumerate(zip(procs, errs))]
    raise AssertionError(f"not all exited within {timeout} s\n" + "\n".join(tails))
  return [p.returncode for p in procs], errs
