"""A child process that ends when its parent does.

Grain's loader workers are daemon processes: multiprocessing ends them when their parent exits
normally. A parent ended from outside (JAX's heartbeat aborting a host whose peer failed, the
kernel's out-of-memory killer, SIGKILL) runs no exit handler, and its workers, which wait on their
full output queues, would live on, holding its stderr and shared memory. Linux's parent-death
signal does not fit: it follows the thread that started the child, and Grain starts its workers
from its reading threads, which may end before the process does."""
from __future__ import annotations

import os
import threading
import time


def exit_with_parent(parent_pid: int, poll_s: float = 1.0) -> threading.Thread:
  """Starts a daemon thread that ends this process within `poll_s` once its parent is no longer
  `parent_pid` (the kernel gives an orphan another parent). The parent passes its own pid: a
  child that asked `os.getppid()` at its start would miss a parent that died before then."""

  def watch():
    while os.getppid() == parent_pid:
      time.sleep(poll_s)
    os._exit(1)  # nobody is left to read an orderly exit: skip its handlers

  thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
  thread.start()
  return thread
