#!/usr/bin/env bash
# The main job on the embedded default (README Quickstart). Extra arguments go to launch/demo.py.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python launch/demo.py "$@"
