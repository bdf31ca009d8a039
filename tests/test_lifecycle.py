"""Stopping a launch stops the job (no rank outlives its launcher), and one live run per run directory."""
import json
import os
import signal
import socket
import time

import psutil
import pytest

from maskdit_ds.checkpoint import check_tag, list_tags
from maskdit_ds.errors import RunDirBusy
from maskdit_ds.lifecycle import LOCK_FILE, LOCK_STALE_S, RunLock

from _launch import start, stats, train, wait_for_step

LONG = ["engine.precision=fp32", "train.steps=100000", "train.ckpt_every=50000"]  # stopped long before the end


def rank_processes(proc) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank" in " ".join(p.cmdline())]


def assert_stopped_with_checkpoint(proc, ranks, run_dir, after_step: int) -> str:
    gone, alive = psutil.wait_procs(ranks, timeout=90)
    assert not alive, f"ranks outlived their launcher: {[p.pid for p in alive]}"
    output = proc.stdout.read()
    proc.wait(timeout=30)
    tags = list_tags(run_dir / "checkpoints")
    assert tags, output[-3000:]
    newest = int(tags[-1].split("_")[1])
    assert after_step <= newest < 50000 and check_tag(run_dir / "checkpoints" / tags[-1]) is None
    assert f"saved step {newest}, exiting 75" in output
    return output


@pytest.mark.integration
def test_kill_of_the_deepspeed_command_stops_its_ranks_and_a_second_launch_is_refused(tmp_path):
    proc = start(tmp_path, "held", LONG)
    wait_for_step(tmp_path / "held", 3, proc)
    ranks = rank_processes(proc)
    assert len(ranks) == 2
    second = train(tmp_path, "held", LONG, timeout=120)  # same run directory while the first one trains
    assert second.returncode == 2
    assert f"{tmp_path / 'held'} is in use by pid {ranks[0].pid}" in second.stdout or \
           f"{tmp_path / 'held'} is in use by pid {ranks[1].pid}" in second.stdout, second.stdout[-2000:]
    assert all(p.is_running() for p in ranks)  # the refused launch left the live run alone
    step = max(s["step"] for s in stats(tmp_path / "held"))
    proc.send_signal(signal.SIGTERM)  # `kill <pid>` of the deepspeed command: only the runner gets it
    output = assert_stopped_with_checkpoint(proc, ranks, tmp_path / "held", step)
    assert "[stop] the launcher (pid" in output, output[-3000:]
    assert not (tmp_path / "held" / LOCK_FILE).exists()  # released on the way out


@pytest.mark.integration
def test_ctrl_c_saves_and_exits(tmp_path):
    proc = start(tmp_path, "interrupted", LONG)
    wait_for_step(tmp_path / "interrupted", 3, proc)
    ranks = rank_processes(proc)
    step = max(s["step"] for s in stats(tmp_path / "interrupted"))
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the whole foreground group gets SIGINT
    output = assert_stopped_with_checkpoint(proc, ranks, tmp_path / "interrupted", step)
    assert "[stop] received SIGINT" in output, output[-3000:]


# ------------------------------------------------------------------------------------------------ the lock


def write_lock(run_dir, **fields):
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time(),
              "slurm_job": None, "heartbeat": time.time(), **fields}
    (run_dir / LOCK_FILE).write_text(json.dumps(holder))


def test_live_lock_is_refused_with_its_holder(tmp_path):
    write_lock(tmp_path, host="node17", pid=4242, slurm_job="991")
    with pytest.raises(RunDirBusy, match=r"in use by pid 4242 on host node17 \(SLURM job 991\)"):
        RunLock(tmp_path, say=lambda m: None).acquire()


@pytest.mark.parametrize("fields, reason", [
    ({"pid": 2**22 + 12345}, "on this host is gone"),  # a pid that is not running here
    ({"started": 1.0}, "on this host is gone"),  # our pid, but another process's start time: a reused pid
    ({"host": "node17", "heartbeat": time.time() - LOCK_STALE_S - 5}, "heartbeat is"),
    ({"host": "node17", "slurm_job": "555"}, "earlier attempt of this SLURM job 555"),
])
def test_stale_lock_is_taken_over(tmp_path, monkeypatch, fields, reason):
    monkeypatch.setenv("SLURM_JOB_ID", "555")
    write_lock(tmp_path, **fields)
    said = []
    lock = RunLock(tmp_path, say=said.append)
    lock.acquire()
    assert reason in said[0]
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_torn_lock_counts_as_stale_once_old(tmp_path):
    (tmp_path / LOCK_FILE).write_text("{\"host\": \"no")  # a crash mid-write
    with pytest.raises(RunDirBusy):
        RunLock(tmp_path, say=print).acquire()
    old = time.time() - LOCK_STALE_S - 5
    os.utime(tmp_path / LOCK_FILE, (old, old))
    RunLock(tmp_path, say=print).acquire()
