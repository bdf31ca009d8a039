#!/usr/bin/env bash
# Wheels of everything maskdit_ds and tools/gpu_check.sh need beside torch (deepspeed, diffusers, datasets,
# transformers, tensorboard, ... and every package they import, e.g. xxhash for datasets, msgpack and py-cpuinfo
# for deepspeed), for one Python version, into a git-ignored folder that tools/gpu_check.sh installs from with
# `pip install --no-index`. Run it where the package registries are reachable:
#
#   bash tools/make_wheelhouse.sh [--python 3.12] [--out .wheelhouse]
#
# The folder is emptied first (two versions of one package would make the --no-index install fail). The list is
# tools/wheelhouse_requirements.py's: requirements.txt but torch, and their requirements recursively, at the
# versions installed in $PYTHON's environment (default: this checkout's .venv), written to <out>/requirements.txt.
# deepspeed is source-only on PyPI; `pip wheel --no-deps` builds its pure-Python wheel (its ops are JIT-compiled
# where they run; training needs none of them). tests/integration/test_wheelhouse.py installs the result into a
# venv holding torch alone.
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
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PIP=${PIP:-$PYTHON -m pip}
rm -rf "$OUT"
mkdir -p "$OUT"
"$PYTHON" tools/wheelhouse_requirements.py --python "$PY" > "$OUT/requirements.txt"

$PIP wheel -q --no-deps -w "$OUT" "$(grep '^deepspeed==' "$OUT/requirements.txt")"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
grep -v '^deepspeed==' "$OUT/requirements.txt" > "$OUT/binary.txt"
$PIP download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp "${PLATFORMS[@]}" \
  -d "$OUT" -r "$OUT/binary.txt"
rm "$OUT/binary.txt"
echo "$(ls "$OUT"/*.whl | wc -l) wheels for Python $PY in $OUT ($(du -sh "$OUT" | cut -f1))"
