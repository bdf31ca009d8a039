#!/bin/bash
# MaskDiT ImageNet 256x256 masked training: 1 node x 8 GPUs.
#   sbatch slurm/train_256.sh [section.key=value ...]        (from the repository root)
# Environment (defaults): CONFIG=imagenet256 RUN_NAME=$CONFIG OUT_DIR=runs VENV= PYTHON=python MASTER_PORT=20000+job%10000.
# Ranks: one task per GPU; the trainer maps SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID itself. On USR1 (sent
# --signal seconds before the time limit) it saves and exits 75, and the job requeues itself (slurm/common.sh).
# The step (slurm/common.sh): srun --kill-on-bad-exit=1 python -m maskdit_ds train --config "$CONFIG" \
#   run.out_dir="$OUT_DIR" run.name="$RUN_NAME" "$@"; the run directory gets slurm_jobs.log. See docs/launch.md.
#SBATCH --job-name=maskdit-256
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out

CONFIG=${CONFIG:-imagenet256}
MASKDIT_ROOT=${MASKDIT_ROOT:-$SLURM_SUBMIT_DIR}
source "$MASKDIT_ROOT/slurm/common.sh" || { echo "no $MASKDIT_ROOT/slurm/common.sh: submit from the repository root or set MASKDIT_ROOT" >&2; exit 2; }
maskdit_train "$@"
