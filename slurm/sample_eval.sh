#!/bin/bash
# Sample from a trained model on every GPU (python -m maskdit_ds sample), then score the samples (python -m maskdit_ds eval, one task).
#   sbatch slurm/sample_eval.sh <sample arguments> -- <eval arguments>     (from the repository root)
# The arguments before the first `--` go to `python -m maskdit_ds sample`, the rest to `python -m maskdit_ds eval`, unchanged, e.g.
#   sbatch slurm/sample_eval.sh runs/imagenet256_tune --out runs/imagenet256_tune/samples --num-images 50000 \
#          -- runs/imagenet256_tune/samples/samples.npz VIRTUAL_imagenet256_labeled.npz \
#             --weights pt_inception-2015-12-05-6726825d.pth --out runs/imagenet256_tune/samples/fid.json
# Image i uses seed i, so the .npz does not depend on the GPU count; a requeued or resubmitted job keeps the
# finished chunks under --out. Without `--` only the sampler runs.
# Environment (defaults): VENV= PYTHON=python MASTER_PORT=20000+job%10000.
#SBATCH --job-name=maskdit-sample-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=04:00:00
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out

MASKDIT_ROOT=${MASKDIT_ROOT:-$SLURM_SUBMIT_DIR}
source "$MASKDIT_ROOT/slurm/common.sh" || { echo "no $MASKDIT_ROOT/slurm/common.sh: submit from the repository root or set MASKDIT_ROOT" >&2; exit 2; }
maskdit_env || exit

sample_args=() eval_args=() seen_split=0
for arg in "$@"; do
  if [[ $seen_split == 0 && $arg == -- ]]; then seen_split=1; continue; fi
  if [[ $seen_split == 0 ]]; then sample_args+=("$arg"); else eval_args+=("$arg"); fi
done

maskdit_srun "$PYTHON" -m maskdit_ds sample "${sample_args[@]}"
maskdit_log "sample exited $STEP_CODE"
[[ $STEP_CODE == 0 && $seen_split == 1 ]] || exit "$STEP_CODE"
# FID/IS/precision/recall over the whole .npz is one process: one task, one GPU of this allocation.
maskdit_srun --ntasks=1 --nodes=1 "$PYTHON" -m maskdit_ds eval "${eval_args[@]}"
maskdit_log "eval exited $STEP_CODE"
exit "$STEP_CODE"
