#!/usr/bin/env bash
# The Python 3.12 x86-64 wheels that bench/gpu_session.sh installs on a GPU image which has jax,
# flax, optax, orbax, torch and transformers but not the rest of our needs (the trainer's data,
# config and metrics packages; diffusers for the torch baseline), at the versions of
# constraints.txt. Run once where pip can reach the package index; writes .whl/ (git-ignored):
#
#   bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
pins() {  # the constraints.txt line of each package name given
  for name in "$@"; do
    grep -i -E "^${name}==" constraints.txt || { echo "no pin for $name in constraints.txt" >&2; exit 1; }
  done
}
platforms=()
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 \
         manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  $(pins grain array_record clu ml_collections tensorboardX diffusers importlib_metadata portpicker)
ls -l .whl
