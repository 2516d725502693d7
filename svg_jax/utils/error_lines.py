"""One line that tells what an exception was, for errors a user reads on one line.

A failure for lack of memory is told apart from any other: it says nothing against the files or
the program, so callers keep a checkpoint in place or report a configuration that does not fit,
instead of treating it as damage or a bug."""
from __future__ import annotations

# TensorStore appends its whole request to an error's first line; the part before says what failed.
_TENSORSTORE_DETAILS = " See full TensorStore details"


def first_line(error: BaseException, limit: int = 300) -> str:
  """`Type: first non-empty line of the message`, cut to `limit` characters."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  first = (lines[0] if lines else "").split(_TENSORSTORE_DETAILS)[0]
  text = f"{type(error).__name__}: {first}"
  return text if len(text) <= limit else text[:limit - 3] + "..."


def out_of_memory_line(error: BaseException) -> str | None:
  """The line of `error` that says it ran out of host or device memory, else None.

  Recognized: the host's MemoryError, XLA's RESOURCE_EXHAUSTED on any backend (XLA:TPU raises it
  at compile time for a program larger than its HBM) and other allocators' "out of memory"."""
  if isinstance(error, MemoryError):
    return f"MemoryError: {error}" if str(error) else "MemoryError"
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
    return None
  lines = [ln.strip() for ln in text.splitlines() if "memory" in ln.lower()]
  return (lines[0] if lines else text.splitlines()[0])[:300]
