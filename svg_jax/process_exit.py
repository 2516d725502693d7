"""How a process of a run ends early: its one line, a note of it for the other processes, and an
exit that does not wait for them.

JAX's own exit (`jax.distributed.shutdown` at interpreter exit) is a barrier of all processes. A
process that fails alone (a save, a host's memory) leaves the others waiting for it in a
collective or a checkpoint barrier, so both would wait until a timeout and abort, after 5 minutes
on two local processes. Gone at once, it is a dead task to JAX's coordination service, which stops
the others within `train.heartbeat_timeout_s`.

The others then fail with an error of their own ("connection closed by peer"), which says nothing
of the cause. So a process that ends early leaves its line in the coordination service's
key-value store first, and a process that ends early after it prints that line beside its own:
the log of any host names the cause. (The store lives in process 0; when process 0 is the one
that failed, the others cannot read it and print only their own line. Process 0 leaves after the
others' notes, or after a few seconds, so that peers ending with it keep their own lines.)"""
from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import time
from typing import NoReturn

import jax

from svg_jax import multihost

_KEY_DIR = multihost.ENDED_EARLY_KEYS
_STORE_TIMEOUT_S = 5.0  # a coordinator that died with the failed process does not answer
_COORDINATOR_WAIT_S = 5.0


def _within_timeout(call) -> None:
  """Runs `call` for at most _STORE_TIMEOUT_S; its failure is ignored (no store: the
  coordinator is gone), as is a call still waiting then."""

  def run():
    try:
      call()
    except Exception:  # noqa: BLE001  (a lost line is no reason to stay)
      pass

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(_STORE_TIMEOUT_S)


def _lines_of_others(client) -> list[str]:
  """`process p ended before this one, exit c: its line`, for each process that left a note."""
  found: list[tuple[str, str]] = []
  _within_timeout(lambda: found.extend(client.key_value_dir_get(_KEY_DIR)))
  me = str(jax.process_index())
  notes = sorted((key.rsplit("/", 1)[-1], note) for key, note in found)
  return [f"process {process} ended before this one, {note}" for process, note in notes
          if process != me]


def _await_notes_of_others(client) -> None:
  """Process 0 serves the store, which ends with it: a peer that is ending too, reading or
  leaving its note then, would end in JAX's abort (a C++ stack) instead of its line. So process 0
  leaves once every other process has left its note, or after _COORDINATOR_WAIT_S (peers that
  are not ending leave none)."""
  deadline = time.monotonic() + _COORDINATOR_WAIT_S
  while time.monotonic() < deadline:
    found: list = []
    _within_timeout(lambda: found.extend(client.key_value_dir_get(_KEY_DIR)))
    if len(found) >= jax.process_count():
      return
    time.sleep(0.1)


def _leave_note(client, code: int, reason: str) -> None:
  _within_timeout(lambda: client.key_value_set(f"{_KEY_DIR}{jax.process_index()}",
                                               f"exit {code}: {reason}", allow_overwrite=True))


def exit_process(code: int, reason: str, *, now: bool = False) -> NoReturn:
  """Ends this process with exit status `code` after its caller printed why; `reason` is that
  in one line. A process of a multi-process run prints the lines of processes that ended before
  it, leaves its own for those that end after it, and leaves at once. `now`: leave at once on one
  process too (called from a thread other than the main one, where sys.exit would end only that
  thread, or while the main thread is stuck)."""
  sys.stdout.flush()
  multi = jax.distributed.is_initialized() and jax.process_count() > 1
  if not (multi or now):
    sys.stderr.flush()
    sys.exit(code)
  client = multihost.coordination_client() if multi else None
  if client is not None:
    for line in _lines_of_others(client):
      print(line, file=sys.stderr)
    _leave_note(client, code, reason)
    if jax.process_index() == 0:
      _await_notes_of_others(client)
  sys.stderr.flush()
  # os._exit skips multiprocessing's exit handler, which ends daemonic children (a loader's
  # worker processes that an error left running): they would outlive this process.
  for child in multiprocessing.active_children():
    child.kill()
  logging.shutdown()
  os._exit(code)
