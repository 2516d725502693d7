"""What a failed checkpoint save prints besides the run's one line (`checkpoint.SaveFailed`), made
short. On a full disk, a save of configs/tiny.py left about 2,500 lines on stderr around that
line:
- orbax logs the failure once per thread that saw it (4 ERROR records, ~320 lines of chained
  tracebacks): each is printed as its first line, the whole record goes to
  `<workdir>/orbax_errors.<process>.log` (nothing is lost);
- tensorstore's writes still in flight finish into the event loop orbax has closed, and Python
  reports each "Event loop is closed" RuntimeError as unraisable (0 to 800 of them, 5 lines
  apiece): those reports go, every other unraisable is reported as before;
- asyncio reports each write task (or gathering future) into the failed folder, or of orbax's own
  code, whose error nobody retrieved, and Python each write coroutine never awaited, at exit,
  after the run's line: those go once the save has failed.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings

_ORBAX_FILES = os.sep + "orbax" + os.sep


class _OrbaxErrorsInOneLine(logging.Filter):
  """An ERROR record of orbax's own code keeps its message's first line on the console; the
  record in full (traceback included) is appended to `path`."""

  def __init__(self, path: str):
    super().__init__()
    self.path = path

  def filter(self, record):
    if record.levelno < logging.ERROR or _ORBAX_FILES not in record.pathname:
      return True
    full = logging.Formatter("%(asctime)s %(pathname)s:%(lineno)d\n%(message)s").format(record)
    try:
      with open(self.path, "a") as f:
        f.write(full + "\n\n")
      where = f"in full in {self.path}"
    except OSError:  # the disk that failed the save may take no log either
      where = "its traceback could not be written to a file"
    first = record.getMessage().split("\n", 1)[0]
    record.msg, record.args = f"{first} [orbax error; {where}]", None
    record.exc_info = record.exc_text = record.stack_info = None
    return True


def shorten(workdir: str, process_index: int) -> None:
  """Installs, once per process, the one-line form of orbax's errors (their records appended to a
  file of `workdir`, the newest given) and the drop of "Event loop is closed" unraisables."""
  path = os.path.join(workdir, f"orbax_errors.{process_index}.log")
  absl_logger = logging.getLogger("absl")  # absl.logging's records, orbax's among them
  installed = [f for f in absl_logger.filters if isinstance(f, _OrbaxErrorsInOneLine)]
  if installed:
    installed[0].path = path  # the newest run's workdir
  else:
    absl_logger.addFilter(_OrbaxErrorsInOneLine(path))
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_reports", False):
    return

  def hook(report):
    if not (isinstance(report.exc_value, RuntimeError)
            and str(report.exc_value) == "Event loop is closed"):
      previous(report)

  hook.drops_closed_loop_reports = True
  sys.unraisablehook = hook


class _WritesOfAFailedSave(logging.Filter):
  def __init__(self, directory: str):
    super().__init__()
    self.directory = directory

  def filter(self, record):
    message = record.getMessage()
    return not ("exception was never retrieved" in message
                and (self.directory in message or _raised_in_orbax(record.exc_info)))


def _raised_in_orbax(exc_info) -> bool:
  """Whether the exception came out of orbax's code: a write of orbax's own files (its metadata)
  fails with an error that names no folder (`OSError(27, 'File too large')`)."""
  tb = exc_info[2] if isinstance(exc_info, tuple) else None
  return any(_ORBAX_FILES in frame.filename for frame in traceback.extract_tb(tb))


def drop_reports_of_writes_into(directory: str) -> None:
  """From now on, asyncio's "... exception was never retrieved" reports (of Tasks, of
  _GatheringFutures) of writes into `directory`, whose save has failed, are dropped: each repeats
  the error SaveFailed gives, one per array."""
  logging.getLogger("asyncio").addFilter(_WritesOfAFailedSave(directory))
  # The write coroutines the failed save never started, reported at exit.
  warnings.filterwarnings("ignore", message="coroutine .* was never awaited",
                          category=RuntimeWarning)
