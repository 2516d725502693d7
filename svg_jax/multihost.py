"""Starting the processes of a multi-host run together (`jax.distributed.initialize`).

The same command runs on every host: the launcher says how many processes there are and which one
this is (JAX detects a TPU pod slice, SLURM and OpenMPI; anything else sets `EXPLICIT_ENV`), and on
one process all of this is a no-op. Peers that never join end JAX's wait with a C++ abort and its
stack ("Check failure stack trace"), which names neither the wait nor what to check; here the wait
ends first, with one line and exit status 2, as any other bad set-up does.
"""
from __future__ import annotations

import inspect
import os
import sys
import threading
from typing import Any, Callable

import jax
from absl import logging

from svg_jax import input_errors

# The explicit set, for plain SSH or any launcher JAX does not detect: all three or none.
EXPLICIT_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")

JAX_HEARTBEAT_TIMEOUT_S = 100  # jax.distributed.initialize's defaults
JAX_INIT_TIMEOUT_S = 300
# JAX's own wait is set this much longer than ours, so that ours is the one that ends it.
_JAX_WAIT_MARGIN_S = 30
_JOIN_HELP = ("start the same command on every host (each with its own process id), check that "
              "every host reaches the coordinator's address and port, or raise "
              "train.distributed_init_timeout_s")


class DistributedSetupError(input_errors.InputError):
  """The environment describes a multi-process run that cannot be started (one line)."""
  kind = "multi-host setup error"


def explicit_cluster(env=None) -> dict[str, Any] | None:
  """`jax.distributed.initialize` kwargs from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID, None when none is set; a partial or malformed set raises one line."""
  env = os.environ if env is None else env
  given = {k: env[k] for k in EXPLICIT_ENV if env.get(k)}
  if not given:
    return None
  if len(given) < len(EXPLICIT_ENV):
    missing = [k for k in EXPLICIT_ENV if k not in given]
    raise DistributedSetupError(f"{', '.join(sorted(given))} set but {', '.join(missing)} not: an "
                                "explicit multi-host start needs all of " + ", ".join(EXPLICIT_ENV))
  try:
    num, pid = int(given["JAX_NUM_PROCESSES"]), int(given["JAX_PROCESS_ID"])
  except ValueError:
    raise DistributedSetupError("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers, got "
                                f"{given['JAX_NUM_PROCESSES']!r} and {given['JAX_PROCESS_ID']!r}"
                                ) from None
  if num < 1 or not 0 <= pid < num:
    raise DistributedSetupError(f"JAX_PROCESS_ID={pid} is outside [0, JAX_NUM_PROCESSES={num})")
  if ":" not in given["JAX_COORDINATOR_ADDRESS"]:
    raise DistributedSetupError("JAX_COORDINATOR_ADDRESS must be host:port, got "
                                f"{given['JAX_COORDINATOR_ADDRESS']!r}")
  return dict(coordinator_address=given["JAX_COORDINATOR_ADDRESS"], num_processes=num,
              process_id=pid)


def join_within(timeout_s: float, who: str, join: Callable[[], None]) -> None:
  """Runs `join` (which blocks until every process has joined); still waiting after `timeout_s`,
  the process prints one line naming `who` waited and exits 2 at once. The check runs in a thread
  of its own: JAX waits in C++ without holding the interpreter's lock."""
  joined = threading.Event()

  def watch():
    if joined.wait(timeout_s):
      return
    line = (f"{DistributedSetupError.kind}: {who}: not every process joined within "
            f"{timeout_s:g} s; {_JOIN_HELP}")
    print(line, file=sys.stderr, flush=True)
    os._exit(2)  # the main thread is inside JAX's wait: nothing else would end it

  threading.Thread(target=watch, name="multihost-join-watch", daemon=True).start()
  try:
    join()
  finally:
    joined.set()


def initialize_distributed(heartbeat_timeout_s: int | None = None,
                           init_timeout_s: int | None = None) -> None:
  """`jax.distributed.initialize` when the launcher says this run spans several processes.

  Explicit (`EXPLICIT_ENV`, all three) or detected by JAX itself: a TPU pod slice's metadata,
  SLURM (`srun`, one task per host), OpenMPI (`mpirun`). `heartbeat_timeout_s`: how long a
  silent process may stay silent before the others are stopped; `init_timeout_s`: how long the
  processes wait for each other at the start (None: JAX's defaults).
  """
  if jax.distributed.is_initialized():
    return
  options = {}
  if heartbeat_timeout_s is not None and int(heartbeat_timeout_s) != JAX_HEARTBEAT_TIMEOUT_S:
    if "heartbeat_timeout_seconds" not in inspect.signature(jax.distributed.initialize).parameters:
      raise DistributedSetupError(f"this jax {jax.__version__} cannot set the heartbeat timeout "
                                  f"({heartbeat_timeout_s} s); upgrade jax or leave the default "
                                  f"{JAX_HEARTBEAT_TIMEOUT_S} s")
    options["heartbeat_timeout_seconds"] = int(heartbeat_timeout_s)
  wait_s = int(init_timeout_s) if init_timeout_s is not None else JAX_INIT_TIMEOUT_S
  options["initialization_timeout"] = wait_s + _JAX_WAIT_MARGIN_S
  wait = f"waiting up to {wait_s} s for every process to join"
  explicit = explicit_cluster()
  if explicit is not None:
    if explicit["num_processes"] > 1:
      who = (f"process {explicit['process_id']} of {explicit['num_processes']} (coordinator "
             f"{explicit['coordinator_address']})")
      logging.info("%s: %s", who, wait)
      join_within(wait_s, who, lambda: jax.distributed.initialize(**explicit, **options))
    return
  multi = any(os.environ.get(k) for k in (
      "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS",
      "OMPI_COMM_WORLD_SIZE"))
  if os.environ.get("SLURM_NTASKS") == "1" or os.environ.get("OMPI_COMM_WORLD_SIZE") == "1" or (
      os.environ.get("TPU_WORKER_HOSTNAMES", "x") in ("localhost", "")):
    multi = False
  if multi:
    logging.info("a multi-process run detected by JAX: %s", wait)
    join_within(wait_s, "this process of a run detected by JAX",
                lambda: jax.distributed.initialize(**options))
