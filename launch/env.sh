# Sourced by launch/demo.sh, launch/test.sh and .ci/run: makes sure a virtual environment with the
# project and its test extra exists (at $SVG_JAX_VENV, default .venv) and activates it.
# Reinstalls only when setup.py changed.
set -euo pipefail
SVG_JAX_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SVG_JAX_VENV=${SVG_JAX_VENV:-$SVG_JAX_ROOT/.venv}
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
  echo "svg-jax needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
if [ ! -x "$SVG_JAX_VENV/bin/python" ]; then
  "$PY" -m venv "$SVG_JAX_VENV"
fi
stamp="$SVG_JAX_VENV/.svg_jax_setup_sha"
want=$(cat "$SVG_JAX_ROOT/setup.py" "$SVG_JAX_ROOT/launch/env.sh" | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "installing svg-jax and its test extra into $SVG_JAX_VENV ..." >&2
  "$SVG_JAX_VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$SVG_JAX_VENV/bin/python" -m pip install -q -e "$SVG_JAX_ROOT[test]" >&2
  # LPIPS parity reference. --no-deps: its torchvision requirement would pull a multi-GB CUDA torch,
  # and the test builds the VGG16 it needs from torch.nn itself.
  "$SVG_JAX_VENV/bin/python" -m pip install -q --no-deps lpips==0.1.4 >&2
  echo "$want" > "$stamp"
fi
# shellcheck disable=SC1091
source "$SVG_JAX_VENV/bin/activate"
cd "$SVG_JAX_ROOT"
