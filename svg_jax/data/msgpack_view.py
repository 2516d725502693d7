"""A zero-copy reader for the msgpack subset our records use: binary fields come back as views.

`msgpack.unpackb` copies every bin field into a new bytes object; a 2B stage-1 record holds
0.6 MB of arrays in two nested bin fields (the envelope's body and the arrays inside it), so
decoding cost two copies, ~50 us a record (bench/loader.py). Here bins are read-only
`memoryview` slices of the input. Only what `msgpack.packb(..., use_bin_type=True)` writes for
maps, arrays, strings, bins, ints, floats, bools and nil is understood; anything else (ext types,
trailing bytes, truncation) raises `ValueError`, and callers then decode with `msgpack` itself for
its exact error.
"""
from __future__ import annotations

import struct
from typing import Any

_FIXED = {  # marker -> (struct format, size) of fixed-width scalars
    0xca: (">f", 4), 0xcb: (">d", 8),
    0xcc: (">B", 1), 0xcd: (">H", 2), 0xce: (">I", 4), 0xcf: (">Q", 8),
    0xd0: (">b", 1), 0xd1: (">h", 2), 0xd2: (">i", 4), 0xd3: (">q", 8),
}
_SIZED = {  # marker -> (kind, width of the length field)
    0xc4: ("bin", 1), 0xc5: ("bin", 2), 0xc6: ("bin", 4),
    0xd9: ("str", 1), 0xda: ("str", 2), 0xdb: ("str", 4),
    0xdc: ("array", 2), 0xdd: ("array", 4), 0xde: ("map", 2), 0xdf: ("map", 4),
}
_CONSTANTS = {0xc0: None, 0xc2: False, 0xc3: True}
_MAX_DEPTH = 16


class _Reader:

  def __init__(self, data: memoryview):
    self.data = data
    self.pos = 0

  def take(self, n: int) -> memoryview:
    end = self.pos + n
    if end > len(self.data):
      raise ValueError("truncated msgpack data")
    out = self.data[self.pos:end]
    self.pos = end
    return out

  def length(self, width: int) -> int:
    return int.from_bytes(self.take(width), "big")

  def value(self, depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
      raise ValueError("msgpack nesting too deep")
    marker = self.take(1)[0]
    if marker <= 0x7f:
      return marker
    if marker >= 0xe0:
      return marker - 0x100
    if 0x80 <= marker <= 0x8f:
      return self.map(marker & 0x0f, depth)
    if 0x90 <= marker <= 0x9f:
      return [self.value(depth + 1) for _ in range(marker & 0x0f)]
    if 0xa0 <= marker <= 0xbf:
      return str(self.take(marker & 0x1f), "utf-8")
    if marker in _CONSTANTS:
      return _CONSTANTS[marker]
    if marker in _FIXED:
      fmt, size = _FIXED[marker]
      return struct.unpack(fmt, self.take(size))[0]
    if marker not in _SIZED:
      raise ValueError(f"msgpack marker 0x{marker:02x} is outside the supported subset")
    kind, width = _SIZED[marker]
    n = self.length(width)
    if kind == "bin":
      return self.take(n)
    if kind == "str":
      return str(self.take(n), "utf-8")
    if kind == "array":
      return [self.value(depth + 1) for _ in range(n)]
    return self.map(n, depth)

  def map(self, n: int, depth: int) -> dict:
    out = {}
    for _ in range(n):
      key = self.value(depth + 1)
      if not isinstance(key, str):  # msgpack's strict_map_key would refuse it too
        raise ValueError(f"map key of type {type(key).__name__}")
      out[key] = self.value(depth + 1)
    return out


def unpack(data: bytes | memoryview) -> Any:
  """Decodes one msgpack object that spans all of `data`; bins are read-only views of `data`."""
  reader = _Reader(memoryview(data).toreadonly())
  out = reader.value()
  if reader.pos != len(reader.data):
    raise ValueError("trailing bytes after the msgpack object")
  return out
