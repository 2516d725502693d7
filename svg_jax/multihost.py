"""Starting the processes of a multi-host run together (`jax.distributed.initialize`).

The same command runs on every host: the launcher says how many processes there are and which one
this is (JAX detects a TPU pod slice, SLURM and OpenMPI; anything else sets `EXPLICIT_ENV`), and on
one process all of this is a no-op. Peers that never join end JAX's wait with a C++ abort and its
stack ("Check failure stack trace"), which names neither the wait nor what to check; here the wait
ends first, with one line and exit status 2, as any other bad set-up does.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import secrets
import socket
import sys
import threading
import time
from typing import Any, Callable

import jax
from absl import logging

from svg_jax import input_errors
from svg_jax.utils import atomic_files

# The explicit set, for plain SSH or any launcher JAX does not detect: all three or none.
EXPLICIT_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")

JAX_HEARTBEAT_TIMEOUT_S = 100  # jax.distributed.initialize's defaults
JAX_INIT_TIMEOUT_S = 300
JAX_SHUTDOWN_TIMEOUT_S = 300
# Where a process that ends early leaves its line for the others (svg_jax/process_exit.py), key
# `<this><process index>` in JAX's key-value store.
ENDED_EARLY_KEYS = "svg_jax/ended_early/"
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
                           init_timeout_s: int | None = None,
                           shutdown_timeout_s: int | None = None) -> None:
  """`jax.distributed.initialize` when the launcher says this run spans several processes.

  Explicit (`EXPLICIT_ENV`, all three) or detected by JAX itself: a TPU pod slice's metadata,
  SLURM (`srun`, one task per host), OpenMPI (`mpirun`). `heartbeat_timeout_s`: how long a
  silent process may stay silent before the others are stopped; `init_timeout_s`: how long the
  processes wait for each other at the start; `shutdown_timeout_s`: how long a process that is
  done waits at the exit for the others (JAX aborts every process past it; None: JAX's defaults).
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
  if shutdown_timeout_s is not None:
    if "shutdown_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters:
      options["shutdown_timeout_seconds"] = int(shutdown_timeout_s)
    else:
      logging.warning("this jax %s cannot set the shutdown wait: a process done %d s before "
                      "another is aborted with it", jax.__version__, JAX_SHUTDOWN_TIMEOUT_S)
  wait_s = int(init_timeout_s) if init_timeout_s is not None else JAX_INIT_TIMEOUT_S
  options["initialization_timeout"] = wait_s + _JAX_WAIT_MARGIN_S
  wait = f"waiting up to {wait_s} s for every process to join"
  explicit = explicit_cluster()
  # JAX's preemption service takes SIGTERM once the processes have joined, and keeps it until the
  # trainer's own stop handler replaces it after start-up (minutes on a pod): a stop sent then
  # was lost. Without it SIGTERM ends a starting process at once, on one host as on several.
  if "jax_enable_preemption_service" in jax.config.values:
    jax.config.update("jax_enable_preemption_service", False)
  if explicit is not None:
    if explicit["num_processes"] > 1:
      who = (f"process {explicit['process_id']} of {explicit['num_processes']} (coordinator "
             f"{explicit['coordinator_address']})")
      _check_coordinator_address(explicit["coordinator_address"], explicit["process_id"] == 0)
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


def _check_coordinator_address(address: str, serves: bool) -> None:
  """One line for what JAX reports badly: a port that process 0 cannot serve (a segfault in
  gRPC) and a host name the others cannot resolve (the join's timeout, minutes later)."""
  host, _, port_text = address.rpartition(":")
  host = host.strip("[]")
  try:
    port = int(port_text)
  except ValueError:
    raise DistributedSetupError(f"the port of JAX_COORDINATOR_ADDRESS {address!r} is not a "
                                "number") from None
  if serves:
    if not _can_listen(port):
      raise DistributedSetupError(
          f"port {port} on this host (process 0 serves the coordinator there) is taken by another "
          "program; choose another port in JAX_COORDINATOR_ADDRESS on every host")
    return
  try:
    socket.getaddrinfo(host, port)
  except OSError as e:
    raise DistributedSetupError(f"the coordinator's host {host!r} (JAX_COORDINATOR_ADDRESS) "
                                f"cannot be resolved from this host: {e}") from None


def _can_listen(port: int) -> bool:
  """Whether JAX's coordinator (gRPC, on every address, with SO_REUSEPORT) could listen on `port`:
  an earlier run's coordinator that is still ending does not block it, another program does."""
  for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
    try:
      probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
      continue  # no IPv6 on this host: try IPv4
    with probe:
      probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      if hasattr(socket, "SO_REUSEPORT"):
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
      try:
        probe.bind((address, port))
        probe.listen(1)
      except OSError:
        return False
      return True
  return True


# ------------------------------------------------------------------------------------------------
# After the start: the processes compare what must be the same on all of them.


def coordination_client():
  """JAX's coordination service client (its key-value store), or None. JAX keeps it private:
  where a release has moved it, the callers leave out what needs it."""
  try:
    from jax._src import distributed as jax_distributed
  except ImportError:
    return None
  return getattr(getattr(jax_distributed, "global_state", None), "client", None)


def shared_folder(folder: str, timeout_s: float) -> str:
  """"yes" when `folder` on this host is the folder process 0 sees (it writes a file of this run
  there, the others look for it), else "no"; "yes" on one process or without JAX's store."""
  client = coordination_client()
  if jax.process_count() == 1 or client is None:
    return "yes"
  path = os.path.join(folder, ".shared_folder_check")
  if jax.process_index() == 0:
    token = secrets.token_hex(16)
    with open(path + ".tmp", "w") as f:
      f.write(token)
    os.replace(path + ".tmp", path)
    client.key_value_set("svg_jax/shared_folder_token", token, allow_overwrite=True)
    return "yes"
  token = _get(client, "svg_jax/shared_folder_token", 0, timeout_s, "its check file's name")
  try:
    with open(path) as f:
      return "yes" if f.read() == token else "no"
  except OSError:
    return "no"


def check_same_everywhere(what: str, items: dict[str, str], timeout_s: float) -> None:
  """DistributedSetupError when another process's `items` differ from this one's: every process
  compares its own with process 0's, process 0 with every other's, so all of them stop with a
  line naming the differing items and both values. Without JAX's store, logs that it cannot."""
  client = coordination_client()
  count, me = jax.process_count(), jax.process_index()
  if count == 1:
    return
  if client is None:
    logging.warning("this jax keeps its key-value store elsewhere: the processes' %s are not "
                    "compared", what)
    return
  text = json.dumps(items, sort_keys=True)
  digest = hashlib.sha256(text.encode()).hexdigest()
  prefix = f"svg_jax/same_everywhere/{re.sub(r'[^A-Za-z0-9]+', '_', what)}/"
  client.key_value_set(f"{prefix}items/{me}", text, allow_overwrite=True)
  client.key_value_set(f"{prefix}digest/{me}", digest, allow_overwrite=True)
  peers = range(1, count) if me == 0 else (0,)
  differ = [p for p in peers if _get(client, f"{prefix}digest/{p}", p, timeout_s, what) != digest]
  if not differ:
    return
  theirs = json.loads(_get(client, f"{prefix}items/{differ[0]}", differ[0], timeout_s, what))
  names = atomic_files.differing_keys(theirs, items)
  shown = "; ".join(f"{k}: {items.get(k, '(none)')} here, {theirs.get(k, '(none)')} on process "
                    f"{differ[0]}" for k in names[:_DIFFERENCES_SHOWN])
  more = f"; {len(names) - _DIFFERENCES_SHOWN} more" if len(names) > _DIFFERENCES_SHOWN else ""
  others = ""
  if me == 0:
    others = (f" (process {differ[0]} differs from this one)" if len(differ) == 1 else
              f" (processes {', '.join(map(str, differ))} differ from this one)")
  raise DistributedSetupError(f"the processes of this run disagree on their {what}{others}: "
                              f"{shown}{more}; start every host with the same command and files")


_DIFFERENCES_SHOWN = 5


def _get(client, key: str, process: int, timeout_s: float, what: str) -> str:
  """The value `process` sets at `key`, waited for in short polls: a process that ended early
  (a config error of its own) leaves its line under ENDED_EARLY_KEYS and never sets `key`, and
  waiting on for it would end in JAX's heartbeat abort, minutes later."""
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      return client.blocking_key_value_get(key, _POLL_MS)
    except Exception as e:  # noqa: BLE001  (JAX's runtime error for a deadline, by status text)
      error = " ".join(str(e).split())[:200]
    try:
      ended = [k.rsplit("/", 1)[-1] for k, _ in client.key_value_dir_get(ENDED_EARLY_KEYS)]
    except Exception:  # noqa: BLE001  (no store: the coordinator is gone)
      ended = []
    if str(process) in ended:
      raise DistributedSetupError(f"process {process} ended before the processes compared their "
                                  f"{what} (its line follows)")
    if time.monotonic() > deadline:
      raise DistributedSetupError(f"process {process} gave no {what} within {timeout_s:g} s "
                                  f"({error})")


_POLL_MS = 1000
