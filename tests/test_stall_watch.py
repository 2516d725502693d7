"""The stall watch (svg_jax/train/stall_watch.py) in this process, with its action replaced by a
list: steps that keep coming keep it quiet, silence fires it once, a timeout after the last step,
with that step and the checkpoint folder, a paused watch leaves no thread and fires only once
armed again, and a stopped or disabled watch never fires. Each firing appends a "stalled" event
(the last step that ended, what the watch waited for) to the metrics file it was given; a watch
that woke far later than it asked (its process was suspended) says so. The real
action (stacks, exit 7) is run by tests/test_multihost.py on a run whose peer was stopped;
tests/test_train.py runs the loop with a hung restore."""
import json
import threading
import time
import types

import pytest

from svg_jax.train import stall_watch

pytestmark = pytest.mark.serial  # timeouts of a fraction of a second


def _wait_for(condition, timeout_s):
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline and not condition():
    time.sleep(0.02)


def _last_event(path):
  with open(path) as f:
    return json.loads(f.readlines()[-1])


def test_steps_keep_it_quiet_and_silence_fires_it_once(tmp_path):
  fired = []
  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text('{"step": 40, "loss": 0.5}\n')
  watch = stall_watch.StallWatch(0.5, "/runs/a/checkpoints",
                                 on_stall=lambda line: fired.append((time.monotonic(), line)),
                                 events_path=str(metrics))
  beats = []
  for step in range(1, 41):  # 2 s of steps 0.05 s apart: four timeouts, quiet only if re-armed
    beats.append(time.monotonic())  # before the beat: the watch's clock starts after it
    watch.beat(step)
    time.sleep(0.05)
  gaps = [b - a for a, b in zip(beats, beats[1:])]
  assert not fired, (fired, max(gaps))
  _wait_for(lambda: fired, 10.0)
  time.sleep(1.0)  # two timeouts: a second firing would have come by now
  assert len(fired) == 1, fired
  when, line = fired[0]
  assert 0.5 <= when - beats[-1] < 10.0  # a whole timeout after the last step, not before
  assert line.startswith("stalled: no step ended for 0.5 s after step 40 (train.stall_timeout_s)")
  assert line.endswith("newest checkpoint in /runs/a/checkpoints")
  assert len(metrics.read_text().splitlines()) == 2  # appended once, after the step's record
  assert _last_event(metrics) == {"step": 40, "event": "stalled",
                                  "waiting_for": "the end of step 41", "timeout_s": 0.5}


def test_a_stopped_or_disabled_watch_never_fires():
  fired = []
  stopped = stall_watch.StallWatch(0.3, "/c", on_stall=fired.append)
  stopped.beat(1)
  stopped.stop()
  disabled = stall_watch.StallWatch(0, "/c", on_stall=fired.append)
  disabled.beat(1)
  time.sleep(1.0)
  assert not fired


def test_a_paused_watch_fires_only_after_it_is_armed_again(tmp_path):
  fired = []
  metrics = tmp_path / "metrics.jsonl"
  watch = stall_watch.StallWatch(0.5, "/c", on_stall=fired.append, events_path=str(metrics))
  watch.step = 6  # as the loop sets it once the state is restored
  watch.expect("restoring checkpoint 6")
  watch.pause()  # a compile follows: 1.5 s, three timeouts
  time.sleep(1.5)
  assert not fired
  assert "stall-watch" not in [t.name for t in threading.enumerate()]  # none left behind
  start = time.monotonic()
  watch.expect("running step 7 (after its compile)")
  _wait_for(lambda: fired, 10.0)
  assert time.monotonic() - start >= 0.5
  assert fired == ["stalled: running step 7 (after its compile) took over 0.5 s "
                   "(train.stall_timeout_s); every thread's stack is above. Rerun the same "
                   "command to resume from the newest checkpoint in /c"]
  assert _last_event(metrics) == {"step": 6, "event": "stalled",
                                  "waiting_for": "running step 7 (after its compile)",
                                  "timeout_s": 0.5}


def test_a_process_that_was_itself_suspended_says_so(tmp_path, monkeypatch):
  """The watch's own wait ends 5 s late (its clock jumps while it waits, as a SIGSTOP then
  SIGCONT leaves it): the line and the event say this process stood still, not that it waited
  for another; a wait that ends on time says nothing of the kind (the first test)."""
  jump = [0.0]
  clock = types.SimpleNamespace(monotonic=lambda: time.monotonic() + jump[0])
  monkeypatch.setattr(stall_watch, "time", clock)
  fired = []
  metrics = tmp_path / "metrics.jsonl"
  watch = stall_watch.StallWatch(0.5, "/c", on_stall=fired.append, events_path=str(metrics))
  watch.beat(3)
  time.sleep(0.1)  # the watch waits: the process "stops" for 5 s
  jump[0] = 5.0
  _wait_for(lambda: fired, 10.0)
  assert len(fired) == 1 and fired[0].startswith(
      "stalled: no step ended for 0.5 s after step 3: this process was itself suspended or not "
      "scheduled for 5 s (its watch woke that much later than it asked) "
      "(train.stall_timeout_s)"), fired
  event = _last_event(metrics)
  assert event["event"] == "stalled" and 4.5 < event["suspended_s"] < 6, event
