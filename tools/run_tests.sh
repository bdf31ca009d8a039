#!/usr/bin/env bash
# The test suite, from a bare machine: set up .venv, then pytest (real 2-rank DeepSpeed runs on CPU included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh -r requirements-test.txt
. .venv/bin/activate
. tools/cpu_env.sh
export HF_HUB_OFFLINE=1 HF_HOME=${HF_HOME:-$PWD/.cache/hf} DEEPSPEED_TIMEOUT=${DEEPSPEED_TIMEOUT:-5}
exec python -m pytest "$@"
