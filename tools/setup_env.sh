#!/usr/bin/env bash
# Create ./.venv (or $VENV) and install maskdit_ds's dependencies: torch first and pinned, then the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
pip install -q -r requirements.txt "$@" 2>&1 | grep -v "^WARNING: Location" || true
# The project itself, editable: `import maskdit_ds` works from any directory, and edits take effect.
pip install -q --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
(cd / && python -c "import torch, deepspeed, diffusers, datasets, sklearn, transformers, matplotlib, maskdit_ds") >/dev/null 2>&1 \
  || { echo "setup failed: dependencies did not install" >&2; exit 1; }
