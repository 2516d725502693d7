"""Output folders checked before the work that fills them: a run, a sampling job or a benchmark
finds out that its folder cannot be written at once, not after hours of compute."""
from __future__ import annotations

import os

from svg_jax.input_errors import InputError


class FolderNotWritable(InputError):
  """An output folder that cannot be made or written (one line)."""


def check_writable_folder(path: str | os.PathLike, what: str, create: bool = True) -> None:
  """Makes the folder `path` if it is missing (with `create`; without, the nearest folder that
  exists above it must be writable, so that a job that fails before its first file leaves
  nothing behind); FolderNotWritable naming `what` when it cannot be made (a file in its place,
  a read-only file system) or written."""
  path = os.fspath(path)
  if create:
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      raise FolderNotWritable(f"{what} {path} cannot be made: {e.strerror or e}") from None
    existing = path
  else:
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
      existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
      raise FolderNotWritable(f"{what} {path} cannot be made: {existing} is a file")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise FolderNotWritable(f"{what} {path} cannot be written" + (
        "" if existing == path else f" ({existing} is not writable)"))
