#!/usr/bin/env bash
# Wheels of what a GPU image usually lacks (deepspeed, diffusers, datasets and their pure-Python needs, hjson,
# pydantic, lmdb), for one Python version, into a git-ignored folder that tools/gpu_check.sh installs from with
# `pip install --no-index`. Run it where the package registries are reachable:
#
#   bash tools/make_wheelhouse.sh [--python 3.12] [--out .wheelhouse]
#
# Versions: requirements.txt's pins, and for the rest the versions installed in this checkout's .venv (one
# consistent set). deepspeed is source-only on PyPI; `pip wheel --no-deps` builds its pure-Python wheel (its ops
# are JIT-compiled where they run; training needs none of them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=3.12 OUT=.wheelhouse
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PY=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "usage: bash tools/make_wheelhouse.sh [--python X.Y] [--out DIR]" >&2; exit 2 ;;
  esac
done
PIP=${PIP:-python3 -m pip}
mkdir -p "$OUT"
pinned() { grep -i "^$1==" requirements.txt | head -n 1; }
installed() { python3 -c "from importlib.metadata import version; print('$1==' + version('$1'))" 2>/dev/null \
  || { [ -x .venv/bin/python ] && .venv/bin/python -c "from importlib.metadata import version; print('$1==' + version('$1'))"; }; }

$PIP wheel -q --no-deps -w "$OUT" "$(pinned deepspeed)"
PACKAGES=("$(pinned diffusers)" "$(pinned datasets)" "$(pinned lmdb)")
for name in dill multiprocess hjson pydantic pydantic-core annotated-types typing-inspection importlib-metadata; do
  PACKAGES+=("$(installed "$name")")
done
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
$PIP download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp "${PLATFORMS[@]}" \
  -d "$OUT" "${PACKAGES[@]}"
ls -la "$OUT"
du -sh "$OUT"
