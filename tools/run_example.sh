#!/usr/bin/env bash
# The built-in example, from a bare machine: set up .venv, train MaskDiT on scikit-learn's digits with the
# deepspeed launcher (2 CPU ranks, or every GPU), then sample with the EMA + guidance into runs/digits/.
# Extra arguments are config overrides, e.g. run.name=digits2 train.stages.0.steps=100.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
. .venv/bin/activate
. tools/cpu_env.sh
if [ "${DS_ACCELERATOR:-}" = cpu ]; then RANKS=2; else RANKS=$(python -c "import torch; print(torch.cuda.device_count())"); fi
# In-training FID against the real digits, when the Inception weights are on disk (they are never downloaded here;
# `python -c "from maskdit_ds.evaluation.weights import download_weights; download_weights()"` fetches them).
WEIGHTS=${INCEPTION_WEIGHTS:-$HOME/.cache/maskdit_ds/pt_inception-2015-12-05-6726825d.pth}
FID=()
if [ -f "$WEIGHTS" ]; then
  mkdir -p runs/refs
  [ -f runs/refs/digits_ref.npz ] || { python tools/digits_reference.py --out runs/refs/digits_real.npz &&
    python -m maskdit_ds eval ref --images runs/refs/digits_real.npz --out runs/refs/digits_ref.npz --weights "$WEIGHTS"; }
  FID=(eval.fid_every=500 eval.fid_samples=500 eval.fid_ref=runs/refs/digits_ref.npz "eval.inception_weights=$WEIGHTS")
else
  echo "in-training FID off: no Inception weights at $WEIGHTS (set INCEPTION_WEIGHTS=...; see docs/evaluation.md)"
fi
# --log_level warning: the launcher's INFO lines (CUDA_VISIBLE_DEVICES=0,1, spawn commands) are GPU-oriented
# noise on a CPU host, where each "GPU" is one rank; its "Unable to find hostfile" warning only means one machine.
deepspeed --log_level warning --num_gpus "$RANKS" --master_port "$(free_port)" --module maskdit_ds train --config digits \
  train.micro_batch=$((128 / RANKS)) "${FID[@]}" "$@"
NAME=$(python -c "import sys; from maskdit_ds.config import load_config; print(load_config('digits', sys.argv[1:]).run_dir)" \
  train.micro_batch=$((128 / RANKS)) "$@")
echo "samples: $NAME/samples.npz, $NAME/samples.png"
cat "$NAME/samples.json"
