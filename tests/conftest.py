"""Test environment: CPU DeepSpeed settings, offline hubs, the shared helpers, and the markers.

tests/unit/         invariants and contracts, in this process
tests/integration/  real multi-process runs (DeepSpeed launcher, torchrun, SLURM, installs): marked
                    `integration` here; CI runs them too (`-m "not integration"` skips them locally)
tests/support/      helpers (launch.py runs the real trainer) and test-only set-up (cpu_fp16/)
"""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "support"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config, items):
    integration = ROOT / "tests" / "integration"
    for item in items:
        if integration in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)
    if os.environ.get("RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow end-to-end run: set RUN_SLOW=1 to include")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
