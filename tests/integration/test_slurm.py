"""The real sbatch templates (slurm/*.sh) on a throwaway one-node SLURM cluster on localhost, 2 CPU tasks per job:
a run trains and checkpoints; a preemption signal makes it checkpoint, requeue itself and resume to the exact step."""
from __future__ import annotations

import re
import os
import time
from pathlib import Path

import pytest

from repo import ROOT
from slurm_helpers import ENDED, job_env, job_log, running_cluster, stats_steps, wait_until_ended
from maskdit_ds.training.checkpoint import check_tag, list_tags

# sbatch options on the command line override the templates' #SBATCH lines: 2 CPU tasks instead of 8 GPUs.
# --time stays far above the templates' --signal=USR1@600 lead, or SLURM would send the signal at once.
CPU = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=30"]
# The digits preset with the tiny model, one stage, fp32: dotted overrides passed through the template's "$@".
TINY = ["model.name=MaskDiT-T/2", "train.stages=[]", "train.micro_batch=8", "train.global_batch=16",
        "engine.precision=fp32", "sample.final_samples=0", "train.grid_every=0", "train.log_every=1",
        "data.num_workers=0", "model.input_size=16", "data.resolution=16"]


@pytest.fixture(scope="module")
def cluster():
    """munged + slurmctld + slurmd started here and stopped here (only those); a skip with the reason otherwise."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("the SLURM tests run 2 tasks of 1 CPU each; this machine has 1 CPU")
    with running_cluster() as started:
        yield started


def submit(cluster, template: str, logs: Path, env: dict, args: list) -> int:
    return cluster.sbatch([*CPU, f"--output={logs}/%x-%j.out", f"slurm/{template}", *args], env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def trained(cluster, tmp_path_factory):
    """sbatch slurm/train_256.sh: 4 steps, checkpoints every 2. Returns (run dir, job info, log)."""
    out, logs = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("logs")
    job = submit(cluster, "train_256.sh", logs, job_env(out, "t256"), [*TINY, "train.steps=4", "train.ckpt_every=2"])
    info = wait_until_ended(cluster, job, logs, timeout=300)
    return out / "t256", info, job_log(logs, job)


def test_train_template_trains_and_checkpoints(trained):
    run, info, log = trained
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-4000:]}"
    assert "tasks=2" in log and info["NumTasks"] == "2"
    assert stats_steps(run) == [1, 2, 3, 4], log[-4000:]
    tags = list_tags(run / "checkpoints")
    assert tags == ["step_0000002", "step_0000004"] and all(check_tag(run / "checkpoints" / t) is None for t in tags)
    files = {p.name for p in (run / "checkpoints" / "step_0000004").iterdir()}
    assert {"train_state_rank000.pt", "train_state_rank001.pt"} <= files  # one state per srun task: world 2
    assert (run / "export" / "step_0000004" / "model.safetensors").exists()
    assert (run / "config.yaml").exists() and (run / "ds_config.json").exists()
    jobs = (run / "slurm_jobs.log").read_text()  # the job wrote into its run directory
    assert "restart=0" in jobs and "tasks=2" in jobs and jobs.rstrip().endswith("exit=0")


def test_preemption_signal_checkpoints_requeues_and_resumes(cluster, tmp_path):
    steps = 100
    out, logs = tmp_path / "runs", tmp_path / "logs"
    logs.mkdir()
    job = submit(cluster, "train_256.sh", logs, job_env(out, "pre"), [*TINY, f"train.steps={steps}",
                                                                    "train.ckpt_every=1000"])
    run = out / "pre"
    deadline = time.monotonic() + 240
    while len(stats_steps(run)) < 2:  # training is under way on both tasks
        assert time.monotonic() < deadline and cluster.job(job).get("JobState") not in ENDED, job_log(logs, job)
        time.sleep(0.2)
    # What --signal=USR1@600 does before the time limit: slurmstepd sends USR1 to every task of the job step.
    cluster.scancel("--signal=USR1", job)
    info = wait_until_ended(cluster, job, logs, timeout=400)
    log = job_log(logs, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-4000:]}"
    assert info["Restarts"] == "1", f"{info}\n{log[-4000:]}"

    jobs = (run / "slurm_jobs.log").read_text().splitlines()
    assert [line.split()[-1] for line in jobs if "exit=" in line] == ["exit=75", "exit=0"], jobs
    assert "restart=1" in jobs[2], jobs
    stopped = int(re.search(r"\[stop\] received SIGUSR1: saved step (\d+), exiting 75", log).group(1))
    assert 2 <= stopped < steps, f"the run ended before the signal arrived; raise `steps`\n{log[-3000:]}"
    assert f"[resume] from {run / 'checkpoints' / f'step_{stopped:07d}'}" in log
    assert list_tags(run / "checkpoints") == [f"step_{stopped:07d}", f"step_{steps:07d}"]
    assert all(check_tag(run / "checkpoints" / t) is None for t in list_tags(run / "checkpoints"))
    # Nothing lost and nothing repeated: the first start logged 1..stopped, the requeued one stopped+1..steps.
    assert stats_steps(run) == list(range(1, steps + 1))


def test_sample_eval_template_runs_both_tools(cluster, trained, tmp_path):
    run, info, _ = trained
    assert info["JobState"] == "COMPLETED"
    logs = tmp_path / "logs"
    logs.mkdir()
    env = job_env(tmp_path, "unused")
    job = submit(cluster, "sample_eval.sh", logs, env, [
        str(run), "--out", str(tmp_path / "samples"), "--num-images", "6", "--steps", "2", "--batch-size", "2",
        "--chunk-size", "4", "--grid", "0", "--no-progress", "--", "--help"])
    info = wait_until_ended(cluster, job, logs, timeout=300)
    log = job_log(logs, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-4000:]}"
    import numpy as np

    with np.load(tmp_path / "samples" / "samples.npz") as npz:
        assert npz["arr_0"].shape == (6, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
    # The arguments after `--` reached `python -m maskdit_ds eval` in the second step (here --help: its usage, exit 0).
    assert "eval exited 0" in log and "reference batch .npz" in log, log[-3000:]
