# Sourced by the example and test scripts: settings that make DeepSpeed behave on CPU-only hosts.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # >1 per rank oversubscribes cores (5-50x slower) and deadlocks forks
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu
fi
free_port() { python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
