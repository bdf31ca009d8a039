"""End to end with the real `deepspeed` launcher on 2 CPU ranks: fp16 masked phase, fp32 tuning from it, and
resume after a kill or a preemption signal giving exactly the losses of an uninterrupted run."""
import json
import re
import signal

import psutil
import pytest
import torch

import maskdit_ds
from maskdit_ds.training.checkpoint import check_tag, list_tags

from launch import FP16, kill_group, start, stats, train, wait_for_step


def losses_by_step(run_dir):
    return {s["step"]: s["loss"] for s in stats(run_dir)}  # later lines (after a resume) win


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    proc = train(out, "masked", ["engine.precision=fp16", "mask.ratio=0.5", "train.steps=4", "train.ckpt_every=2",
                                 "optim.lr=1e-3"], **FP16)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return out / "masked"


def test_fp16_masked_phase_trains_and_checkpoints(masked_run):
    rows = stats(masked_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["mask_ratio"] == 0.5 and r["mae"] > 0 and r["loss"] == r["loss"] for r in rows)
    assert rows[0]["loss_scale"] > 1  # dynamic loss scaling is active
    for key in ("images_per_s", "tflops", "peak_mem_gb"):
        assert rows[-1][key] > 0
    assert all(r["mfu"] is None or 0 < r["mfu"] <= 1 for r in rows)  # a share of the peak, or absent
    tags = list_tags(masked_run / "checkpoints")
    assert tags == ["step_0000002", "step_0000004"] and all(check_tag(masked_run / "checkpoints" / t) is None
                                                            for t in tags)
    files = {p.name for p in (masked_run / "checkpoints" / "step_0000004").iterdir()}
    assert {"train_state_rank000.pt", "train_state_rank001.pt", "ema.safetensors", "complete.json"} <= files
    config = json.loads((masked_run / "export" / "step_0000004" / "config.json").read_text())
    assert config["step"] == 4 and config["model"]["name"] == "MaskDiT-T/2"
    net = maskdit_ds.load_pretrained(masked_run)  # newest export, no DeepSpeed involved
    x = torch.randn(2, 1, 16, 16)
    out = net(x, torch.tensor([1.0, 2.0]), torch.tensor([3, 4]))
    assert out.shape == x.shape and torch.isfinite(out).all() and not net.training


def test_fp32_tuning_starts_from_masked_checkpoint(masked_run, tmp_path):
    proc = train(tmp_path, "tune", ["engine.precision=fp32", "mask.ratio=0.0", "optim.lr=5e-5", "train.steps=3",
                                    "train.ckpt_every=3", f"train.init_from={masked_run}"])
    assert proc.returncode == 0, proc.stdout[-4000:]
    rows = stats(tmp_path / "tune")
    assert [r["step"] for r in rows] == [5, 6, 7]  # the step count continues
    assert all(r["mask_ratio"] == 0 and r["mae"] == 0 and r["lr"] == 5e-5 and r["loss_scale"] == 1 for r in rows)
    lineage = json.loads((tmp_path / "tune" / "lineage.json").read_text())
    assert lineage["checkpoint"].endswith("step_0000004") and lineage["step"] == 4 and lineage["ema"] == "continued"
    assert lineage["init_from"] == str(masked_run) and lineage["data"]["source"] == "digits"
    exported = json.loads((tmp_path / "tune" / "export" / "step_0000007" / "config.json").read_text())
    assert exported["lineage"]["init_from"] == str(masked_run)


RESUME = ["engine.precision=fp16", "train.steps=8", "train.ckpt_every=3", "optim.lr=1e-3"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    proc = train(out, "whole", RESUME, **FP16)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return losses_by_step(out / "whole")


def test_kill_and_resume_gives_identical_losses(uninterrupted, tmp_path):
    proc = start(tmp_path, "killed", RESUME, **FP16)
    wait_for_step(tmp_path / "killed", 5, proc)
    kill_group(proc)  # SIGKILL: nothing gets to save; resume falls back to the step-3 checkpoint
    assert max(losses_by_step(tmp_path / "killed")) < 8
    again = train(tmp_path, "killed", RESUME, **FP16)
    assert again.returncode == 0, again.stdout[-4000:]
    assert "[resume] from" in again.stdout
    assert losses_by_step(tmp_path / "killed") == uninterrupted
    assert [s["step"] for s in stats(tmp_path / "killed")] == list(range(1, 9))  # no step logged twice


def test_preemption_signal_saves_and_resumes_identically(uninterrupted, tmp_path):
    proc = start(tmp_path, "preempted", RESUME, **FP16)
    wait_for_step(tmp_path / "preempted", 4, proc)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "--local_rank" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    for p in ranks:  # what srun does with --signal=USR1@T: the signal goes to every task
        p.send_signal(signal.SIGUSR1)
    output = proc.communicate(timeout=120)[0]
    # every rank saved and exited 75: DeepSpeed's launcher passes the ranks' code on, and rank 0 said so once
    assert proc.returncode == 75 and len(re.findall(r"saved step \d+, exiting 75", output)) == 1, output[-3000:]
    stopped = max(losses_by_step(tmp_path / "preempted"))
    assert stopped < 8 and check_tag(tmp_path / "preempted" / "checkpoints" / f"step_{stopped:07d}") is None
    again = train(tmp_path, "preempted", RESUME, **FP16)
    assert again.returncode == 0, again.stdout[-4000:]
    assert losses_by_step(tmp_path / "preempted") == uninterrupted


STAGED = ["mask.ratio=0.5", "train.ckpt_every=100", "optim.lr=1e-3",
          "train.stages=[{name: a, steps: 3}, {name: b, steps: 2, overrides: {mask.ratio: 0.0}}]"]


def test_resume_at_a_stage_boundary_continues_exactly_and_a_finished_run_trains_nothing(tmp_path):
    whole = train(tmp_path, "whole", STAGED)
    assert whole.returncode == 0, whole.stdout[-4000:]
    first = train(tmp_path, "split", [*STAGED[:-1], "train.stages=[{name: a, steps: 3}]"])  # ends at the boundary
    assert first.returncode == 0, first.stdout[-4000:]
    second = train(tmp_path, "split", STAGED)
    assert second.returncode == 0, second.stdout[-4000:]
    assert "[stage 0]" not in second.stdout and "[stage 1] b: 2 steps" in second.stdout
    assert losses_by_step(tmp_path / "split") == losses_by_step(tmp_path / "whole")  # bit-identical steps 4, 5
    rerun = train(tmp_path, "whole", STAGED)
    assert rerun.returncode == 0, rerun.stdout[-4000:]
    assert "[stage" not in rerun.stdout and "training already finished at step 5" in rerun.stdout
