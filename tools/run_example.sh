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
deepspeed --num_gpus "$RANKS" --master_port "$(free_port)" --module maskdit_ds train --config digits \
  train.micro_batch=$((128 / RANKS)) "$@"
NAME=$(python -c "import sys; from maskdit_ds.config import load_config; print(load_config('digits', sys.argv[1:]).run_dir)" \
  train.micro_batch=$((128 / RANKS)) "$@")
echo "samples: $NAME/samples.npz, $NAME/samples.png"
cat "$NAME/samples.json"
