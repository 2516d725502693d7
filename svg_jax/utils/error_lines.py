"""One line that tells what an exception was, for errors a user reads on one line.

A failure for lack of memory is told apart from any other: it says nothing against the files or
the program, so callers keep a checkpoint in place or report a configuration that does not fit,
instead of treating it as damage or a bug."""
from __future__ import annotations

import re

# TensorStore appends its whole request to an error's first line; the part before says what failed.
_TENSORSTORE_DETAILS = " See full TensorStore details"


# ... and puts the operating system's reason at its end, after paths that may run to hundreds of
# characters: "... Failed to write 2297900 bytes to file 12: File too large [os_error_code='27']".
_TENSORSTORE_OS_ERROR = re.compile(r"([^:\]\[]+?) \[os_error_code='(\d+)'\]")


def first_line(error: BaseException, limit: int = 300) -> str:
  """`Type: first non-empty line of the message`, cut to `limit` characters; an operating-system
  reason that TensorStore gives at its end comes first ("File too large [errno 27]; Type: ...")."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  first = (lines[0] if lines else "").split(_TENSORSTORE_DETAILS)[0]
  text = f"{type(error).__name__}: {first}"
  os_error = _TENSORSTORE_OS_ERROR.search(first)
  if os_error:
    text = f"{os_error.group(1).strip()} [errno {os_error.group(2)}]; {text}"
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
