#!/usr/bin/env bash
# The test suite (the README's test command). With no arguments: the tests that may share the
# cores run on pytest-xdist workers (one per core, at most 8; SVG_JAX_TEST_WORKERS overrides),
# then the `serial` ones (several processes, watches and signals timed in seconds) run alone.
# With arguments: one plain pytest run of them.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ $# -gt 0 ]; then
  exec python -m pytest -q "$@"
fi
cores=$(nproc 2>/dev/null || echo 2)
workers=${SVG_JAX_TEST_WORKERS:-$((cores < 8 ? cores : 8))}
# loadfile: a module's tests stay on one worker, so its module-wide fixtures are built once.
shared=0
python -m pytest -q -m "not serial" -n "$workers" --dist loadfile || shared=$?
if [ "$shared" -gt 1 ]; then  # interrupted (Ctrl-C), a usage or internal error: stop here
  exit "$shared"
fi
alone=0
python -m pytest -q -m serial || alone=$?
exit $((shared != 0 ? shared : alone))
