#!/bin/bash
# Encode a dataset to a MaskDiT latent cache, one task per GPU (each task encodes its own shard).
#   sbatch slurm/cache_latents.sh --source /data/imagenet --out /data/latents/in256 --vae /models/sd-vae
# Every argument goes to `python -m maskdit_ds cache` unchanged. The tool resumes a partial cache, so a killed or requeued
# job continues where it stopped; rank/world come from SLURM_PROCID/SLURM_NTASKS (no process group).
# Environment (defaults): VENV= PYTHON=python.
#SBATCH --job-name=maskdit-cache
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out

MASKDIT_ROOT=${MASKDIT_ROOT:-$SLURM_SUBMIT_DIR}
source "$MASKDIT_ROOT/slurm/common.sh" || { echo "no $MASKDIT_ROOT/slurm/common.sh: submit from the repository root or set MASKDIT_ROOT" >&2; exit 2; }
maskdit_env || exit
maskdit_srun "$PYTHON" -m maskdit_ds cache "$@"
maskdit_log "cache_latents exited $STEP_CODE"
exit "$STEP_CODE"
