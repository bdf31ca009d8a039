"""Checkpoint safety: killed or truncated saves are skipped on resume; pickles that carry code are refused."""
import os
import subprocess

import pytest
import torch

import ckpt_helpers as _ckpt_helpers
import launch as _launch
from ckpt_helpers import RunsAShellCommand, copy_run
from maskdit_ds.training import checkpoint as ckpt
from maskdit_ds.convert import ConversionError, convert_dit, convert_paper
from repo import tool_command


def test_tag_of_a_killed_save_is_skipped(tmp_path):
    run = copy_run(tmp_path)
    (run / "checkpoints" / "step_0000002" / ckpt.MANIFEST).unlink()  # the save never reached its last write
    warnings = []
    assert ckpt.latest_good_tag(run / "checkpoints", warn=warnings.append) == "step_0000001"
    assert len(warnings) == 1 and "step_0000002" in warnings[0] and "no complete.json" in warnings[0]


def test_corrupted_file_of_the_right_size_is_skipped_on_resume(tmp_path):
    run = copy_run(tmp_path)
    tag = run / "checkpoints" / "step_0000002"
    victim = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with open(victim, "r+b") as f:  # flip one byte in the middle: same size, different content
        f.seek(victim.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert ckpt.check_tag(tag) is None  # the cheap size scan (used when pruning) cannot see it
    warnings = []
    assert ckpt.latest_good_tag(run / "checkpoints", warn=warnings.append) == "step_0000001"
    assert len(warnings) == 1 and victim.name in warnings[0] and "sha256" in warnings[0]


def test_truncated_tag_is_skipped_and_the_run_resumes_from_the_older_one(tmp_path):
    run = copy_run(tmp_path)
    newest = run / "checkpoints" / "step_0000002" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    os.truncate(newest, newest.stat().st_size // 2)
    warnings = []
    assert ckpt.latest_good_tag(run / "checkpoints", warn=warnings.append) == "step_0000001"
    assert "truncated" in warnings[0] and newest.name in warnings[0]

    proc = _launch.train(tmp_path, "r", _ckpt_helpers.RUN_OVERRIDES, ranks=2, **_ckpt_helpers.FP16)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "skipping" in proc.stdout and f"[resume] from {run / 'checkpoints' / 'step_0000001'}" in proc.stdout
    assert ckpt.check_tag(run / "checkpoints" / "step_0000002") is None  # step 2 was trained and saved again
    assert [s["step"] for s in _launch.stats(run)][-1] == 2
    # Resume is exact: the re-done step 2 equals the uninterrupted run's step 2, bit for bit.
    from maskdit_ds.training.engine import consolidated_fp32_state

    redone = consolidated_fp32_state(run / "checkpoints" / "step_0000002")
    original = consolidated_fp32_state(_ckpt_helpers.trained_run() / "checkpoints" / "step_0000002")
    assert all(torch.equal(redone[k], original[k]) for k in original), (
        "resume is not exact: the first DataLoader iterator after set_rng_state must not draw from the global "
        "torch RNG (give the DataLoader its own generator)")


@pytest.mark.parametrize("importer", [convert_paper, convert_dit])
@pytest.mark.parametrize("where", ["args", "ema"])
def test_pickle_that_carries_code_is_refused(tmp_path, importer, where):
    marker = tmp_path / "pwned"
    payload = {"ema": {"x_embedder.proj.weight": torch.zeros(1)}, "args": None}
    payload[where] = RunsAShellCommand(marker) if where == "args" else {"w": RunsAShellCommand(marker)}
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(ConversionError, match="refused to unpickle.*system"):
        importer(tmp_path / "evil.pt", tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_cli_refuses_a_pickle_that_carries_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"ema": {}, "args": RunsAShellCommand(marker)}, tmp_path / "evil.pt")
    proc = subprocess.run(tool_command("convert_checkpoint", "reference", tmp_path / "evil.pt", "--out",
                                       tmp_path / "out"), capture_output=True, text=True, timeout=120, env=_launch.env())
    assert proc.returncode == 2 and "refused to unpickle" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists() and not (tmp_path / "out").exists()
