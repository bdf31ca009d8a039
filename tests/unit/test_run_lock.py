"""The run-directory lock: a live holder is refused by name, a stale one (dead process, old heartbeat, an earlier attempt of the same SLURM job, a torn file) is taken over."""
import json
import os
import socket
import time

import psutil
import pytest

from maskdit_ds.errors import RunDirBusy
from maskdit_ds.training.lifecycle import LOCK_FILE, LOCK_STALE_S, RunLock


# ------------------------------------------------------------------------------------------------ the lock


def write_lock(run_dir, **fields):
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time(),
              "slurm_job": None, "heartbeat": time.time(), **fields}
    (run_dir / LOCK_FILE).write_text(json.dumps(holder))


def test_live_lock_is_refused_with_its_holder(tmp_path):
    write_lock(tmp_path, host="node17", pid=4242, slurm_job="991")
    with pytest.raises(RunDirBusy, match=r"in use by pid 4242 on host node17 \(SLURM job 991\)"):
        RunLock(tmp_path).acquire()


@pytest.mark.parametrize("fields, reason", [
    ({"pid": 2**22 + 12345}, "on this host is gone"),  # a pid that is not running here
    ({"started": 1.0}, "on this host is gone"),  # our pid, but another process's start time: a reused pid
    ({"host": "node17", "heartbeat": time.time() - LOCK_STALE_S - 5}, "heartbeat is"),
    ({"host": "node17", "slurm_job": "555"}, "earlier attempt of this SLURM job 555"),
])
def test_stale_lock_is_taken_over(tmp_path, monkeypatch, capsys, fields, reason):
    monkeypatch.setenv("SLURM_JOB_ID", "555")
    write_lock(tmp_path, **fields)
    lock = RunLock(tmp_path)
    lock.acquire()
    said = capsys.readouterr().out
    assert said.startswith(f"[lock] taking over {tmp_path / LOCK_FILE}: ") and reason in said
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_torn_lock_counts_as_stale_once_old(tmp_path):
    (tmp_path / LOCK_FILE).write_text("{\"host\": \"no")  # a crash mid-write
    with pytest.raises(RunDirBusy, match=r"in use by pid \? on host \?"):  # a fresh torn file names no holder
        RunLock(tmp_path).acquire()
    old = time.time() - LOCK_STALE_S - 5
    os.utime(tmp_path / LOCK_FILE, (old, old))
    RunLock(tmp_path).acquire()
