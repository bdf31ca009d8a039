#!/usr/bin/env bash
# Validate a machine with one or more GPUs, offline, in one command (under 8 minutes; each phase has its own
# timeout): environment, collectives under NCCL, flash attention, GEMM peaks, the training benchmark (XL/2 256 px,
# batch 128, fp16 and bf16, masked/unmasked, eager/compiled, plain-PyTorch baseline), a 20-step run of the real
# trainer (checkpoint, SIGUSR1 -> 75, resume, grids, in-training FID), sampling and VAE throughput.
#
#   bash tools/gpu_check.sh [--out DIR] [--wheels DIR] [--smoke]
#
# Writes DIR/gpu_check.json and DIR/gpu_check.md (default DIR: gpu_check_out). Installs nothing from the network:
# packages the GPU image lacks come from a wheelhouse made by tools/make_wheelhouse.sh on a machine with the
# package registries (default: .wheelhouse). --smoke: tiny sizes on a CPU (the test suite runs this).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=gpu_check_out WHEELS=.wheelhouse SMOKE=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --smoke) SMOKE=(--smoke); shift ;;
    *) echo "usage: bash tools/gpu_check.sh [--out DIR] [--wheels DIR] [--smoke]" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
rm -f "$OUT"/phase_*.json

if ! "$PYTHON" -c "import deepspeed, diffusers, datasets" >/dev/null 2>&1; then
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check: deepspeed/diffusers/datasets are missing and $WHEELS holds no wheels;" \
         "run 'bash tools/make_wheelhouse.sh' where PyPI is reachable and bring $WHEELS along" >&2
    exit 2
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$OUT/site" \
    "$WHEELS"/*.whl || exit 2
  export PYTHONPATH="$OUT/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

phase() {  # phase NAME SECONDS: one phase under its own time limit; a timeout is recorded like a failure
  local name=$1 limit=$2 start rc
  start=$(date +%s)
  timeout --kill-after=15 "$limit" "$PYTHON" tools/gpu_check.py "$name" --out "$OUT" "${SMOKE[@]}"
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    printf '{"status": "timeout", "error": "over its %s s limit", "seconds": %s}\n' "$limit" \
      "$(( $(date +%s) - start ))" > "$OUT/phase_$name.json"
    echo "[gpu_check] $name: timeout after $limit s"
  fi
}

phase env 30
phase collectives 45
phase attention 30
phase gemm 30
phase bench 180
phase trainer 90
phase sampling 60
phase vae 30
"$PYTHON" tools/gpu_check.py report --out "$OUT"
