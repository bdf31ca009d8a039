"""Test environment: CPU DeepSpeed settings, offline hubs, the shared helpers, and the markers.

tests/unit/         invariants and contracts, in this process
tests/integration/  real multi-process runs (DeepSpeed launcher, torchrun, SLURM, installs): marked
                    `integration` here; CI runs them too (`-m "not integration"` skips them locally)
tests/support/      helpers (repo.py: the repository's paths and the one way to load a tools/ script; launch.py
                    runs the real trainer) and test-only set-up (cpu_fp16/)
Shared fixtures live here (inception_weights); tests take the repository root from tests/support/repo.py.
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


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """(path, sha256) of a random-but-seeded FID Inception weight file, made once per test session (read-only)."""
    from eval_helpers import write_weights

    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    return path, write_weights(path, seed=0)
