#!/usr/bin/env bash
# The test suite (the README's test command). Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest -q "$@"
