# Sourced by launch/demo.sh, launch/test.sh and .ci/run: makes sure a virtual environment with the
# project and its test extra exists (at $SVG_JAX_VENV, default .venv) and activates it.
# Python: $PYTHON, else the newest python3.12 / python3.11 / python3.10 found. The exact versions
# the tests were measured with (constraints.txt) apply where they exist for that Python.
# Reinstalls only when setup.py, constraints.txt or this file changed.
set -euo pipefail
SVG_JAX_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SVG_JAX_VENV=${SVG_JAX_VENV:-$SVG_JAX_ROOT/.venv}
supported='import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)'
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in python3.12 python3.11 python3.10 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "$supported" 2>/dev/null; then
      PY=$candidate
      break
    fi
  done
fi
if [ -z "$PY" ] || ! "$PY" -c "$supported" 2>/dev/null; then
  echo "svg-jax needs Python 3.10-3.12 (found none; set PYTHON=/path/to/python3.x)" >&2
  exit 1
fi
if [ ! -x "$SVG_JAX_VENV/bin/python" ]; then
  "$PY" -m venv "$SVG_JAX_VENV"
fi
stamp="$SVG_JAX_VENV/.svg_jax_setup_sha"
want=$(cat "$SVG_JAX_ROOT/setup.py" "$SVG_JAX_ROOT/constraints.txt" "$SVG_JAX_ROOT/launch/env.sh" \
  | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "installing svg-jax and its test extra into $SVG_JAX_VENV ..." >&2
  pip=("$SVG_JAX_VENV/bin/python" -m pip)
  "${pip[@]}" install -q --upgrade pip >&2
  if "$SVG_JAX_VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    "${pip[@]}" install -q -e "$SVG_JAX_ROOT[test]" -c "$SVG_JAX_ROOT/constraints.txt" >&2
  else  # the measured versions are for 3.11; other Pythons take the newest compatible ones
    "${pip[@]}" install -q -e "$SVG_JAX_ROOT[test]" >&2
  fi
  # The LPIPS and decoder-training references (the lpips package; taming-transformers'
  # discriminator and GAN loss). --no-deps: their torchvision requirement would pull a multi-GB
  # CUDA torch (the tests build the VGG16 they need from torch.nn), and taming's Lightning and
  # OmegaConf serve only its training scripts.
  "${pip[@]}" install -q --no-deps lpips==0.1.4 taming-transformers==0.0.1 >&2
  echo "$want" > "$stamp"
fi
# shellcheck disable=SC1091
source "$SVG_JAX_VENV/bin/activate"
cd "$SVG_JAX_ROOT"
