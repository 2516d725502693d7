"""The progress line: how often it is printed on a terminal and into a log (a clock of the test's
own stands in for time.perf_counter)."""
import io

import pytest

from svg_jax.utils import progress as progress_lib
from svg_jax.utils.progress import Progress


class Terminal(io.StringIO):
  def isatty(self):
    return True


@pytest.fixture
def clock(monkeypatch):
  now = [1000.0]
  monkeypatch.setattr(progress_lib.time, "perf_counter", lambda: now[0])
  return now


def _run(stream, clock, seconds, step=0.125):
  """One unit done every `step` seconds for `seconds` seconds; the total is reached at the end."""
  n = int(round(seconds / step))
  p = Progress(n, what="inputs", stream=stream)
  for _ in range(n):
    clock[0] += step
    p.update(done=1, good=1)
  return p


def test_a_log_gets_the_first_line_then_one_every_30_seconds_and_the_last(clock):
  log = io.StringIO()
  _run(log, clock, seconds=91)
  lines = log.getvalue().splitlines()
  # At 0.125 s (the first update), 30.125, 60.125, 90.125 s and the end: 5 lines, not 180.
  assert [line.split()[1] for line in lines] == ["1/728", "241/728", "481/728", "721/728",
                                                 "728/728"], lines
  assert "\r" not in log.getvalue() and log.getvalue().endswith("\n")


def test_a_terminal_line_overwrites_itself_twice_a_second(clock):
  tty = Terminal()
  _run(tty, clock, seconds=10)
  text = tty.getvalue()
  # The first update, then every 0.5 s up to 9.625 s, then the end (a new line only there).
  assert text.count("\r") == 21 and text.count("\n") == 1 and text.endswith("\n")
  assert text.split("\r")[-1].split()[1] == "80/80"


def test_the_last_line_is_printed_once_and_an_unfinished_line_is_ended(clock):
  log = io.StringIO()
  p = Progress(2, stream=log, min_interval=0.0)
  p(2)
  p(2)  # a sampler's callback may report the end again
  assert log.getvalue().count("2/2") == 1
  p(3, total=4)  # the total grew: lines again
  assert "3/4" in log.getvalue()

  tty = Terminal()
  p = Progress(5, stream=tty)
  p.update(done=1)
  assert "1/5 items" in tty.getvalue() and "\n" not in tty.getvalue()
  p.end_line()  # a job stopped early: its error line starts a line of its own
  p.end_line()
  assert tty.getvalue().endswith("\n") and tty.getvalue().count("\n") == 1


def test_the_rate_and_eta_leave_out_the_first_update(clock):
  """A first batch that took 100 s (its compiles), then one a second: from the second update on,
  the line gives 1/s and the ETA of the remaining units at that rate."""
  log = io.StringIO()
  p = Progress(11, stream=log, min_interval=0.0)
  clock[0] += 100.0
  p.update(done=1)
  assert "0.01/s" in log.getvalue().splitlines()[-1]  # one point: the only rate there is
  clock[0] += 1.0
  p.update(done=1)
  last = log.getvalue().splitlines()[-1]
  assert "1.00/s" in last and "elapsed 0:01:41" in last and "ETA 0:00:09" in last, last
