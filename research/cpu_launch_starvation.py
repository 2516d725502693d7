"""XLA:CPU's launch pool starved behind a collective: the 2-process hang of
docs/design_notes.md ("Metric bookkeeping off the mesh"), reproduced on demand.

Two local processes under JAX's distributed runtime (gloo collectives), 2 CPU devices each, one
4-device mesh. Each iteration puts a host batch on the mesh, runs a jitted step whose loss is an
all-reduce, and then, without waiting, makes clu-like metric updates (`jnp.array` of a host
scalar and two adds, 3 programs a metric):
  --pattern mesh      made inside the run's mesh (`jax.set_mesh`), as the trainer's logger once
                      made them: each tiny op is a program over all 4 devices, launched on both
                      local ones;
  --pattern host_cpu  inside `svg_jax.parallel.on_host_cpu()`, as the logger makes them now.

Why it hangs (xla/pjrt/cpu/cpu_client.cc): a program over several local devices is launched by
one task per device on the client's pool (max(cores, devices) threads: 2 here), each of which
takes a slot of its device's in-flight limit (32) and keeps its pool thread while none is free;
the executions run on the same pool, each multi-device program behind the one before it. When
one device's half of the step waits in the all-reduce on one thread, and the other thread waits
for a slot that only the step's end frees, the step's other half never runs, and the peer
process waits in the all-reduce for good. `--pin` puts both processes on one core, as on a busy
machine, where (likely; not traced) the pool thread that wakes the main thread loses the core to
it and then takes the next launch before the step's other half.

    python research/cpu_launch_starvation.py --pattern mesh --pin --runs 3 [--gdb DIR]
    python research/cpu_launch_starvation.py --pattern host_cpu --pin --runs 3
"""
import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from svg_jax import parallel

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # for svg_jax
# Runs the script on one core, pinned before anything starts a thread (as taskset would; a
# preexec_fn would fork this multithreaded process).
_PINNED = ("import os, runpy, sys; os.sched_setaffinity(0, {%d}); sys.argv = sys.argv[1:]; "
           "runpy.run_path(sys.argv[0], run_name='__main__')")


def worker(a) -> None:
  jax.distributed.initialize(coordinator_address=f"localhost:{a.port}", num_processes=2,
                             process_id=a.rank)
  mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = NamedSharding(mesh, P("d"))

  def step(x, batch):
    x = x + batch * 1e-3
    for _ in range(4):  # some arithmetic, so that the step takes a moment
      x = jnp.tanh(x @ x) * 0.5 + 0.1
    # The mean over the sharded axis is an all-reduce; per-shard means need no communication.
    return x, (jnp.mean(x, axis=(1, 2)) if a.no_collective else jnp.mean(x))

  step = jax.jit(step, out_shardings=(sharded, sharded if a.no_collective else None))
  x = jax.jit(lambda: jnp.full((4, 128, 128), 0.01, jnp.float32), out_shardings=sharded)()
  bookkeeping = contextlib.nullcontext if a.pattern == "mesh" else parallel.on_host_cpu
  with jax.set_mesh(mesh):  # the run's mesh, as the trainer's loop has it (parallel.mesh_context)
    with bookkeeping():  # clu-like accumulators: (total, count) a metric
      accs = [(jnp.array(np.float32(0)), jnp.array(np.int32(0))) for _ in range(a.metrics)]
    previous = None
    for it in range(a.iters):
      if a.rank == 1:  # rank 0's half of the step waits in the all-reduce meanwhile
        time.sleep(a.sleep)
      batch = jax.device_put(np.full((4, 128, 128), it % 7, np.float32), sharded)
      x, loss = step(x, batch)
      with bookkeeping():  # queued right behind the step, none waited for
        for m in range(a.metrics):
          total, count = accs[m]
          accs[m] = (total + jnp.array(np.float32(it + m)), count + jnp.array(np.int32(1)))
      if a.wait_previous and previous is not None:  # as the trainer: one step ahead at most
        previous.block_until_ready()
      previous = loss
      print(f"iteration {it}", flush=True)
    jax.block_until_ready((x, accs))
  print("done", flush=True)


def _gdb_stacks(pid: int, path: str) -> None:
  out = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt"],
                       capture_output=True, text=True, timeout=120)
  with open(path, "w") as f:
    f.write(out.stdout + out.stderr)


def _last_iteration(path: str) -> int:
  with open(path) as f:
    lines = [line for line in f.read().splitlines() if line.startswith("iteration ")]
  return int(lines[-1].split()[1]) if lines else -1


def run_once(pattern: str, *, metrics: int = 60, iters: int = 150, sleep: float = 0.02,
             pin: bool = True, no_collective: bool = False, wait_previous: bool = False,
             stall_s: float = 10.0, timeout_s: float = 120.0, gdb_dir: str | None = None) -> dict:
  """One 2-process run: {"hung": whether a process made no progress for `stall_s` seconds (or
  the run outlived `timeout_s`), "seconds", "iterations": the last each process reached, "exit":
  their return codes, "logs": the end of each one's output}; the stacks of a hang go to
  `gdb_dir` when one is named."""
  with socket.socket() as s:  # a free port for the coordinator
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)  # the explicit coordinator below
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, env.get("PYTHONPATH")]))
  core = min(os.sched_getaffinity(0))
  flags = ["--pattern", pattern, "--metrics", str(metrics), "--iters", str(iters),
           "--sleep", str(sleep), "--port", str(port)]
  flags += ["--no_collective"] * no_collective + ["--wait_previous"] * wait_previous
  with tempfile.TemporaryDirectory() as logs:
    paths = [os.path.join(logs, f"rank{r}.log") for r in range(2)]
    procs = []
    for r in range(2):
      with open(paths[r], "w") as log:
        start = [sys.executable, "-c", _PINNED % core] if pin else [sys.executable]
        procs.append(subprocess.Popen([*start, __file__, *flags, "--rank", str(r)], env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    t0 = time.monotonic()
    progress, moved = [-1, -1], time.monotonic()
    hung = False
    try:
      while any(p.poll() is None for p in procs):
        reached = [_last_iteration(p) for p in paths]
        if reached != progress:
          progress, moved = reached, time.monotonic()
        now = time.monotonic()
        if min(progress) >= 0 and now - moved > stall_s or now - t0 > timeout_s:
          hung = True
          break
        time.sleep(0.2)
      if hung and gdb_dir:
        os.makedirs(gdb_dir, exist_ok=True)
        for r, p in enumerate(procs):
          if p.poll() is None:
            _gdb_stacks(p.pid, os.path.join(gdb_dir, f"{pattern}_rank{r}_{p.pid}.txt"))
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
        p.wait()
    tails = []
    for path in paths:
      with open(path) as f:
        tails.append(f.read()[-2000:])
    return {"hung": hung, "seconds": round(time.monotonic() - t0, 1),
            "iterations": [_last_iteration(p) for p in paths],
            "exit": [p.returncode for p in procs], "logs": tails}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--pattern", choices=["mesh", "host_cpu"], default="mesh")
  p.add_argument("--metrics", type=int, default=60, help="metrics a step (3 programs each)")
  p.add_argument("--iters", type=int, default=150)
  p.add_argument("--sleep", type=float, default=0.02, help="rank 1's sleep before each step")
  p.add_argument("--no_collective", action="store_true", help="a step without an all-reduce")
  p.add_argument("--wait_previous", action="store_true",
                 help="wait for the previous step's loss after each step, as the trainer does")
  p.add_argument("--pin", action="store_true", help="both processes on one core")
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--stall_s", type=float, default=10.0,
                 help="a run with no progress for this long is counted as hung")
  p.add_argument("--gdb", default=None, help="a folder for the stacks of hung processes")
  p.add_argument("--rank", type=int, default=None)  # (the launcher's, for its processes)
  p.add_argument("--port", type=int, default=None)
  a = p.parse_args()
  if a.rank is not None:
    return worker(a)
  hangs = 0
  for i in range(a.runs):
    r = run_once(a.pattern, metrics=a.metrics, iters=a.iters, sleep=a.sleep, pin=a.pin,
                 no_collective=a.no_collective, wait_previous=a.wait_previous,
                 stall_s=a.stall_s, gdb_dir=a.gdb)
    hangs += r["hung"]
    print(f"run {i}: {'hung' if r['hung'] else 'done'} after {r['seconds']} s, iterations "
          f"reached {r['iterations']}, exit {r['exit']}", flush=True)
  print(f"{a.pattern}, metrics {a.metrics}, collective {not a.no_collective}, wait_previous "
        f"{a.wait_previous}, pin {a.pin}: {hangs} of {a.runs} runs hung", flush=True)


if __name__ == "__main__":
  main()
