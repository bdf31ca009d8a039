"""Stopping a launch stops the job: no rank outlives its launcher, and a second launch into a live run directory is refused."""
import os
import signal

import psutil

from maskdit_ds.training.checkpoint import check_tag, list_tags
from maskdit_ds.training.lifecycle import LOCK_FILE

from launch import start, stats, train, wait_for_step

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


def test_ctrl_c_saves_and_exits(tmp_path):
    proc = start(tmp_path, "interrupted", LONG)
    wait_for_step(tmp_path / "interrupted", 3, proc)
    ranks = rank_processes(proc)
    step = max(s["step"] for s in stats(tmp_path / "interrupted"))
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the whole foreground group gets SIGINT
    output = assert_stopped_with_checkpoint(proc, ranks, tmp_path / "interrupted", step)
    assert "[stop] received SIGINT" in output, output[-3000:]


# ------------------------------------------------------------------------------------------------ the lock


