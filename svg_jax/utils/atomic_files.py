"""Files that appear whole or not at all: written under a temporary name, then renamed.

A killed run never leaves a half-written file under the final name, and a reader never sees one.
The temporary name holds the host and the pid, so several processes may write into one shared
folder; it lives in `tmp_dir` (default: the target's folder, so the rename stays on one file system).
Every file gets the permissions a plain `open` gives under the process's umask, whatever the
writer used: safetensors writes its files readable by their owner only.
"""
from __future__ import annotations

import json
import os
import socket
from typing import Any, Callable

import numpy as np


def _read_umask() -> int:
  mask = os.umask(0)  # the only portable read; at import, before the process starts threads
  os.umask(mask)
  return mask


_FILE_MODE = 0o666 & ~_read_umask()


def temp_name(path: str | os.PathLike, tmp_dir: str | None = None) -> str:
  path = os.fspath(path)
  name = f".{os.path.basename(path)}.tmp-{socket.gethostname()}-{os.getpid()}"
  return os.path.join(tmp_dir or os.path.dirname(path) or ".", name)


def write(path: str | os.PathLike, write_to: Callable[[str], Any],
          tmp_dir: str | None = None) -> None:
  """`write_to(tmp)` writes the file at `tmp`; it is then renamed to `path`. On an error the
  temporary file is removed and the error goes on."""
  tmp = temp_name(path, tmp_dir)
  try:
    write_to(tmp)
    os.chmod(tmp, _FILE_MODE)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path: str | os.PathLike, text: str, tmp_dir: str | None = None) -> None:
  def to(tmp):
    with open(tmp, "w") as f:
      f.write(text)
  write(path, to, tmp_dir)


def write_json(path: str | os.PathLike, obj: Any, tmp_dir: str | None = None) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=True), tmp_dir)


def save_npy(path: str | os.PathLike, array: Any, tmp_dir: str | None = None) -> None:
  def to(tmp):
    with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a bare name
      np.save(f, array)
  write(path, to, tmp_dir)


def save_png(path: str | os.PathLike, image: Any, tmp_dir: str | None = None) -> None:
  from PIL import Image

  write(path, lambda tmp: Image.fromarray(np.asarray(image, np.uint8)).save(tmp, format="PNG"),
        tmp_dir)


def append_whole(path: str | os.PathLike, text: str) -> None:
  """`text` appended to `path` (made if missing) by one write call (a loop only if the system
  writes less): a killed process leaves whole lines, never half of one."""
  data = text.encode("utf-8")
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
  try:
    while data:
      data = data[os.write(fd, data):]
  finally:
    os.close(fd)


PNG_START = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"  # the last chunk's type and CRC: every whole PNG ends with them


def whole_png(path: str | os.PathLike) -> bool:
  """Whether `path` is a PNG from its signature to its end chunk. `save_png`'s appear whole; a
  file cut by a copy or a full disk elsewhere is not, and is to be made again."""
  try:
    with open(path, "rb") as f:
      start = f.read(len(PNG_START))
      f.seek(0, os.SEEK_END)
      if f.tell() < len(PNG_START) + len(PNG_END):
        return False
      f.seek(-len(PNG_END), os.SEEK_END)
      return start == PNG_START and f.read() == PNG_END
  except OSError:
    return False


def read_json(path: str | os.PathLike) -> Any | None:
  """The JSON object in `path`, None when there is no such file."""
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def differing_keys(old: dict, new: dict) -> list[str]:
  """Top-level keys whose values differ between two JSON objects (a pinned plan and a new one)."""
  return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
