"""A Ctrl-C that is not lost on its way.

Python's SIGINT handler raises KeyboardInterrupt wherever the main thread is. Raised inside a gc
callback or a finalizer, Python only reports it ("Exception ignored"); raised inside Python code
that a C extension calls and whose errors it clears, it is gone without a word. Either way the job
ran on to its end. `Remembered` raises as Python's handler does and also records the signal, so a
loop that calls `check()` at its safe points stops there when the exception went missing.
"""
import contextlib
import signal


class Remembered:
  """SIGINT raises KeyboardInterrupt (as Python's default handler does) and sets `received`."""

  def __init__(self):
    self.received = False

  def _handle(self, signum, frame):
    del signum, frame
    self.received = True
    raise KeyboardInterrupt

  def check(self) -> None:
    """KeyboardInterrupt when a SIGINT came since `installed()` (its own exception was lost)."""
    if self.received:
      raise KeyboardInterrupt

  @contextlib.contextmanager
  def installed(self):
    """This handler for SIGINT inside the block (none outside the main thread, where Python
    allows no handler: there nothing is remembered)."""
    self.received = False
    try:
      old = signal.signal(signal.SIGINT, self._handle)
    except ValueError:
      old = None
    try:
      yield self
    finally:
      if old is not None:
        signal.signal(signal.SIGINT, old)
