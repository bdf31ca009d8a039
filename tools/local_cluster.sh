#!/usr/bin/env bash
# N hosts on this machine (root only): a network namespace per host joined by a bridge, munged, slurmctld and one
# slurmd per host; every host sees this filesystem (shared storage). What the multi-node tests run on.
#   bash tools/local_cluster.sh up 2                 # node1, node2; prints the SLURM_CONF to export
#   bash tools/local_cluster.sh exec node2 hostname  # a command on one host
#   bash tools/local_cluster.sh status
#   bash tools/local_cluster.sh down                 # removes every namespace, link, file and daemon it made
# slurm-wlm and munge are installed with apt-get when missing. Code: tests/support/local_cluster.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${VIRTUAL_ENV:-}" ]; then PYTHON=.venv/bin/python; fi
# its helpers (tests/support) and the checkout on the path, as conftest.py puts them for the tests
PYTHONPATH="$PWD/tests/support:$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" tests/support/local_cluster.py "$@"
