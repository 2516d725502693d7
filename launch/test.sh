#!/usr/bin/env bash
# The test suite (the README's test command). With no arguments: the tests that may share the
# cores run on pytest-xdist workers (one per core, at most 8 and one per 6 GiB of available
# memory; SVG_JAX_TEST_WORKERS overrides), then the `serial` ones (several processes, watches and
# signals timed in seconds) run alone. With arguments: one plain pytest run of them.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ $# -gt 0 ]; then
  exec python -m pytest -q "$@"
fi
workers=$(nproc 2>/dev/null || echo 2)
workers=$((workers < 8 ? workers : 8))
# A worker with the processes its tests start peaks at about 6 GiB (docs/design_notes.md).
avail_kib=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo 2>/dev/null || true)
if [ -n "$avail_kib" ]; then
  fit=$((avail_kib / (6 * 1024 * 1024)))
  workers=$((fit < workers ? fit : workers))
  workers=$((workers > 1 ? workers : 1))
fi
workers=${SVG_JAX_TEST_WORKERS:-$workers}
# loadfile: a module's tests stay on one worker, so its module-wide fixtures are built once.
shared=0
python -m pytest -q -m "not serial" -n "$workers" --dist loadfile || shared=$?
if [ "$shared" -gt 1 ]; then  # interrupted (Ctrl-C), a usage or internal error: stop here
  exit "$shared"
fi
alone=0
python -m pytest -q -m serial || alone=$?
exit $((shared != 0 ? shared : alone))
