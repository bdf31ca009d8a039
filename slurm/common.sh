# Shared by the sbatch templates in slurm/ (sourced, never run): environment, rendezvous, one srun step, requeue.
#
# Every setting below is a default: export the variable before `sbatch` (sbatch passes the submit environment
# into the job, and again into a requeued job) to change it. Resources belong in #SBATCH lines or on the sbatch
# command line; hyperparameters belong in the preset or in the dotted overrides after the script name.

EXIT_PREEMPTED=75  # the trainer's exit code after it saved on SIGUSR1/SIGTERM (maskdit_ds/errors.py)

maskdit_log() { echo "[slurm $(date '+%F %T') job ${SLURM_JOB_ID:-?}] $*"; }

# ---------------------------------------------------------------- environment for every task
maskdit_env() {
  if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "slurm/common.sh: SLURM_JOB_ID is not set; submit with sbatch, not bash" >&2
    return 2
  fi
  VENV=${VENV:-}                   # a virtualenv whose bin/ goes first on PATH (DeepSpeed's JIT ninja must match)
  if [[ -n $VENV ]]; then
    if [[ ! -x $VENV/bin/python ]]; then
      echo "slurm/common.sh: VENV=$VENV has no bin/python" >&2
      return 2
    fi
    export VIRTUAL_ENV=$VENV PATH="$VENV/bin:$PATH"
  fi
  PYTHON=${PYTHON:-python}
  # The package is imported from the checkout (no install needed): MASKDIT_ROOT is set by the template.
  export PYTHONPATH="$MASKDIT_ROOT${PYTHONPATH:+:$PYTHONPATH}"

  # One process per GPU; srun gives each its SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and the trainer maps them to
  # RANK/WORLD_SIZE/LOCAL_RANK (maskdit_ds/dist.py). A RANK left over from the submit shell would stop that mapping
  # and make every task rank 0, so it is dropped here.
  unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  export MASTER_ADDR
  export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}  # data loading threads per rank
  # SLURM >= 22.05 no longer passes sbatch's --cpus-per-task on to srun: without this each task gets one CPU and
  # the data loader workers starve.
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; fi

  # NCCL (GPU clusters; ignored on CPU). Defaults only; export your own before sbatch to override.
  #   NCCL_DEBUG=INFO               prints the chosen transport (IB / socket) and ring per rank: use on a first run.
  #   NCCL_IB_DISABLE=1             force TCP sockets when InfiniBand is absent or broken (slow across nodes).
  #   NCCL_IB_HCA=mlx5              restrict NCCL to these HCAs (names from `ibv_devices`).
  #   NCCL_SOCKET_IFNAME=ib0|eth0   interface for NCCL's bootstrap and socket transport; set it when nodes have
  #                                 several NICs and the default pick is not routable between them ("^lo,docker").
  #   GLOO_SOCKET_IFNAME=ib0|eth0   the same for gloo, which carries the long barriers (final sampling, resharding)
  #                                 beside NCCL and all of a CPU run: one interface name (no "^" exclusions);
  #                                 taken from NCCL_SOCKET_IFNAME when that names interfaces.
  #   TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (older torch: NCCL_ASYNC_ERROR_HANDLING=1) aborts all ranks when a
  #                                 collective fails or times out, instead of hanging until the SLURM time limit.
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  if [ -n "${NCCL_SOCKET_IFNAME:-}" ] && [ -z "${GLOO_SOCKET_IFNAME:-}" ] \
     && [ "${NCCL_SOCKET_IFNAME#^}" = "$NCCL_SOCKET_IFNAME" ]; then
    export GLOO_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME
  fi
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-$TORCH_NCCL_ASYNC_ERROR_HANDLING}

  maskdit_log "nodes=$SLURM_JOB_NODELIST tasks=${SLURM_NTASKS:-?} restart=${SLURM_RESTART_COUNT:-0}" \
              "master=$MASTER_ADDR:$MASTER_PORT python=$(command -v "$PYTHON")"
}

# ---------------------------------------------------------------- one srun step, signals forwarded
# Runs `srun --kill-on-bad-exit=1 <command...>` in the background and waits for it; sets STEP_CODE to its exit code.
#
# Signals: `--signal=USR1@N` (no `B:`) and `scancel --signal=USR1 <job>` are delivered by slurmstepd to every process
# of the running job steps, i.e. straight to the trainer's tasks, never to this shell. A SIGTERM or SIGUSR1 that does
# reach this shell (`scancel --batch`/`--full`, preemption, the time limit) is passed on to srun, which forwards it
# to its tasks; the trainer saves at the next step boundary either way. `wait` returns early when a trapped signal
# arrives, hence the loop. BATCH_TERM=1 records that this shell itself was sent SIGTERM.
maskdit_srun() {
  BATCH_TERM=0
  srun --kill-on-bad-exit=1 "$@" &
  local pid=$!
  trap "BATCH_TERM=1; maskdit_log 'SIGTERM: forwarding to srun'; kill -TERM $pid 2>/dev/null" TERM
  trap "maskdit_log 'SIGUSR1: forwarding to srun'; kill -USR1 $pid 2>/dev/null" USR1
  while :; do
    wait "$pid"
    STEP_CODE=$?
    kill -0 "$pid" 2>/dev/null || break  # gone: STEP_CODE is its exit code; alive: a trap interrupted wait
  done
  trap - TERM USR1
}

# ---------------------------------------------------------------- training: run dir, srun, requeue on 75
# maskdit_train [dotted overrides...]: CONFIG, OUT_DIR, RUN_NAME decide the run directory <OUT_DIR>/<RUN_NAME>.
# run.out_dir=... / run.name=... among the overrides win over OUT_DIR / RUN_NAME (they are passed last anyway).
maskdit_train() {
  CONFIG=${CONFIG:?set CONFIG (preset name or YAML path)}
  OUT_DIR=${OUT_DIR:-runs}
  RUN_NAME=${RUN_NAME:-$CONFIG}
  local arg
  for arg in "$@"; do
    case $arg in
      run.out_dir=*) OUT_DIR=${arg#*=} ;;
      run.name=*) RUN_NAME=${arg#*=} ;;
    esac
  done
  RUN_DIR=$OUT_DIR/$RUN_NAME
  mkdir -p "$RUN_DIR"
  maskdit_env || return
  # A line per job start in the run directory: which job/log trained which part of this run.
  echo "$(date '+%F %T') job=$SLURM_JOB_ID restart=${SLURM_RESTART_COUNT:-0} nodes=$SLURM_JOB_NODELIST" \
       "tasks=${SLURM_NTASKS:-?} log=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *StdOut=//p')" \
       >> "$RUN_DIR/slurm_jobs.log"

  maskdit_srun "$PYTHON" -m maskdit_ds train --config "$CONFIG" run.out_dir="$OUT_DIR" run.name="$RUN_NAME" "$@"
  echo "$(date '+%F %T') job=$SLURM_JOB_ID exit=$STEP_CODE" >> "$RUN_DIR/slurm_jobs.log"
  maskdit_requeue_if_preempted "$STEP_CODE"
}

# Exit code 75 = the trainer saved a complete checkpoint and wants to continue: put this job back in the queue,
# and the next start resumes from that checkpoint (auto-resume from the run directory). The requeue ends this
# shell at once (SLURM kills the old allocation), so it is the last thing done. Needs --requeue on the job.
# Not when SLURM sent SIGTERM to this shell too: that is `scancel <job>`, the hard time limit or SLURM's own
# preemption, which end the allocation (a requeue would undo a user's scancel; PreemptMode=REQUEUE requeues
# by itself). The checkpoint is saved either way: resubmitting the same command resumes.
maskdit_requeue_if_preempted() {
  local code=$1
  if [[ $code -ne $EXIT_PREEMPTED ]]; then
    maskdit_log "step exited $code"
    exit "$code"
  fi
  if [[ ${BATCH_TERM:-0} == 1 ]]; then
    maskdit_log "trainer saved and exited $EXIT_PREEMPTED after SLURM sent SIGTERM (scancel, time limit or" \
                "preemption): not requeueing; resubmit the same command to resume"
    exit "$code"
  fi
  maskdit_log "trainer saved and exited $EXIT_PREEMPTED: requeueing job $SLURM_JOB_ID"
  if scontrol requeue "$SLURM_JOB_ID"; then
    maskdit_log "requeued: SLURM ends this allocation and starts the job again; it resumes from the checkpoint"
  else
    maskdit_log "scontrol requeue failed; resubmit the same command to resume"
  fi
  exit "$code"
}
