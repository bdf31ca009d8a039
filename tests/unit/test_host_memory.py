"""CPU runs keep freed memory for the next step (hardware.keep_freed_host_memory): a large tensor allocated again
after a free is not page-faulted in again, which is what made ZeRO-2's per-step temporaries expensive on CPU."""
import subprocess
import sys

import pytest

from repo import ROOT

# Allocate and touch a 256 MiB tensor and free it, as a training step does with its temporaries, 14 times; count
# the minor page faults of the last 4: glibc mmaps a block that large and unmaps it on free, so by default every
# page faults again each time (4 x 65536 of 4 KiB). Kept, the heap grows over the first few rounds (torch's
# 64-byte-aligned request does not fit the block just freed while small allocations sit between the blocks;
# measured: 7 rounds) and then reuses its blocks.
PROBE = """
import resource, sys, torch
from maskdit_ds.hardware import keep_freed_host_memory
applied = keep_freed_host_memory() if sys.argv[1] == "keep" else None
def touch():
    t = torch.empty(64 * 2**20, dtype=torch.float32)
    t.fill_(1.0)
    del t
for _ in range(10):
    touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    touch()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, check=True)
    applied, count = out.stdout.split()
    return applied, int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_memory_is_reused_without_page_faults():
    applied, kept = faults("keep")
    _, default = faults("default")
    assert applied == "True"
    # the default re-faults (nearly) every page of the block each time; reuse touches none of them again. The
    # bounds leave room for transparent huge pages (fewer, larger faults) and the interpreter's small allocations.
    assert default > 4000
    assert kept < default / 20, (kept, default)
