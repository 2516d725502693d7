"""An exclusive lock that a job holds on its output folder while it writes there, so that a second
job started on the same folder (or the same part of it) is refused instead of removing the first
one's scratch files as stale.

The lock is `fcntl.flock` on a file that stays in the folder: the kernel releases it when the
holder ends, however it ends (a crash or `kill -9` leaves no stale lock to clean up), and the file
is never removed, since removing it would let two jobs lock two different files of one name.
flock works between hosts only where the file system supports it (NFSv4, Lustre, GPFS do).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator

from svg_jax.input_errors import InputError


class FolderBusy(InputError):
  """Another job holds the lock (one line)."""


@contextlib.contextmanager
def hold(path: str | os.PathLike, busy_message: str) -> Iterator[None]:
  """Holds an exclusive lock on the file `path` (made if missing) for the `with` block; raises
  FolderBusy(busy_message) at once when another process holds it."""
  fd = os.open(os.fspath(path), os.O_RDWR | os.O_CREAT, 0o666)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise FolderBusy(busy_message) from None
      raise
    yield
  finally:
    os.close(fd)  # releases the lock
