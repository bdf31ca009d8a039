#!/usr/bin/env bash
# Validate a machine with one or more GPUs, offline, in one command, the deciding figures first
# (tools/gpu_check_plan.py): environment, NCCL collectives and flash attention; MaskDiT-XL/2 256 px micro-batch 128
# in the default GPU precision, eager, masked 0.5 and unmasked (step time, images/s, MFU, peak memory); the same
# compiled; the other precision and the plain-PyTorch baseline; GEMM peaks; the real trainer (checkpoint,
# SIGUSR1 -> 75, resume, grids, in-training FID); sampling; VAE throughput. Each benchmark runner is a fresh
# process; each phase and runner saves its result as it finishes, under a limit derived from its predicted time,
# so an out-of-memory or timeout costs only itself. Phases that do not fit --budget are dropped, lowest value
# first, and at run time a phase whose prediction no longer fits what is left is skipped.
#
#   bash tools/gpu_check.sh [--out DIR] [--wheels DIR] [--budget SECONDS] [--smoke | --rehearse]
#
# Writes DIR/gpu_check.json and DIR/gpu_check.md (default DIR: gpu_check_out; default budget 480 s, 8 minutes).
# Installs nothing from the network: packages the GPU image lacks come from a wheelhouse made by
# tools/make_wheelhouse.sh (default: .wheelhouse). --smoke: tiny sizes on a CPU (the test suite runs this).
# --rehearse: print, without training, the plan for an 80 GB GPU (phases, runners, predicted memory and time);
# fails if a runner is predicted not to fit or the deciding phases do not fit the budget.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=gpu_check_out WHEELS=.wheelhouse SMOKE=() BUDGET="" REHEARSE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --smoke) SMOKE=(--smoke); shift ;;
    --rehearse) REHEARSE=1; shift ;;
    *) echo "usage: bash tools/gpu_check.sh [--out DIR] [--wheels DIR] [--budget SECONDS] [--smoke | --rehearse]" >&2
       exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
BUDGET_ARGS=()
[ -n "$BUDGET" ] && BUDGET_ARGS=(--budget "$BUDGET")
mkdir -p "$OUT"
rm -f "$OUT"/phase_*.json "$OUT"/runner_*.json "$OUT"/plan.json

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
# one inductor cache for every process of the check: a compiled runner reuses what an earlier process compiled
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
  TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(cd "$OUT" && pwd)/inductor_cache}
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

if [ $REHEARSE -eq 1 ]; then
  exec "$PYTHON" tools/gpu_check_plan.py "${BUDGET_ARGS[@]}" --json "$OUT/plan.json"
fi

# The phase list and limits now (no memory traces: seconds); the full plan with each runner's predicted memory
# in the background while the first phases run (the bench phases wait for it).
"$PYTHON" tools/gpu_check_plan.py --tsv --no-memory "${SMOKE[@]}" "${BUDGET_ARGS[@]}" > "$OUT/plan.tsv" || exit 2
{ "$PYTHON" tools/gpu_check_plan.py --json "$OUT/plan.json.tmp" "${SMOKE[@]}" "${BUDGET_ARGS[@]}" \
    > "$OUT/plan.md" 2>&1  # exit 1 when phases were dropped: a rehearsal's verdict, not an error here
  [ -f "$OUT/plan.json.tmp" ] && mv "$OUT/plan.json.tmp" "$OUT/plan.json"; } &

START=$(date +%s)
phase() {  # phase NAME LIMIT PREDICTED: one phase under its own limit; a timeout is recorded like a failure
  local name=$1 limit=$2 predicted=$3 start rc
  start=$(date +%s)
  if [ -n "$BUDGET" ] && [ $(( start - START + predicted )) -gt "${BUDGET%.*}" ]; then
    printf '{"status": "skipped", "error": "predicted %s s, %s s of the budget left", "seconds": 0}\n' \
      "$predicted" "$(( ${BUDGET%.*} - start + START ))" > "$OUT/phase_$name.json"
    echo "[gpu_check] $name: skipped (predicted $predicted s, budget nearly spent)"
    return
  fi
  timeout --kill-after=15 "$limit" "$PYTHON" tools/gpu_check.py "$name" --out "$OUT" "${SMOKE[@]}" < /dev/null
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    printf '{"status": "timeout", "error": "over its %s s limit (predicted %s s)", "seconds": %s}\n' "$limit" \
      "$predicted" "$(( $(date +%s) - start ))" > "$OUT/phase_$name.json"
    echo "[gpu_check] $name: timeout after $limit s"
  fi
}

while read -r name limit predicted; do
  phase "$name" "$limit" "$predicted"
done < "$OUT/plan.tsv"
wait
"$PYTHON" tools/gpu_check.py report --out "$OUT"
