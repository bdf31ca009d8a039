"""A run that saved on a stop request exits 75 every time: SLURM requeues on that code and no other."""
import json
import subprocess
import sys

from maskdit_ds.training.checkpoint import list_tags

from conftest import ROOT

ROUNDS = 30  # the failure it guards against struck 3 stops in 35


def test_a_2_rank_run_stopped_by_sigusr1_30_times_exits_75_every_time_with_nothing_left_running(tmp_path):
    """Each round resumes the same run, trains, is stopped by SIGUSR1 on both ranks, saves and must exit 75 with
    no thread left but the main one once the command returned: an engine or process group left to the
    interpreter's teardown kept gloo's threads alive there, where a rank aborted after saving (signal 6)."""
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "stop_rounds.py"), str(tmp_path),
                           str(ROUNDS)], capture_output=True, text=True, timeout=600)
    rounds = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and len(rounds) == ROUNDS, done.stderr[-3000:]
    failed = [r for r in rounds if r["codes"] != [75, 75]]
    assert not failed, (failed, (tmp_path / f"round{failed[0]['round']}_rank0.log").read_text()[-3000:])
    left = [r for r in rounds if any(threads is None or len(threads) != 1 for threads in r["threads"])]
    assert not left, f"threads alive after the command: {left[:3]}"
    steps = [r["step"] for r in rounds]
    assert steps == sorted(set(steps)) and steps[0] >= 1  # every round resumed and trained on
    assert list_tags(tmp_path / "stopped" / "checkpoints") == [f"step_{steps[-1]:07d}"]  # keep_last=1
