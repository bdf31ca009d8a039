"""The trainer under fp16 loss scaling on 2 CPU ranks: amp_fp16's GradScaler state survives a resume bitwise, and
a diverged fp16 or amp_fp16 run stops with exit 3 naming the last good tag, having saved nothing non-finite."""
import json

import pytest

from maskdit_ds.config import DS_CONFIG_DIR
from maskdit_ds.training.checkpoint import check_tag, list_tags

from launch import FP16, kill_group, start, stats, train, wait_for_step


def amp_ds_config(tmp_path, init_scale: float) -> str:
    """The shipped amp_fp16 engine config, its loss scale starting at `init_scale` (so that early steps overflow
    and the scale is not the default when the checkpoint is written)."""
    ds = json.loads((DS_CONFIG_DIR / "zero2_amp_fp16.json").read_text())
    ds["amp_grad_scaler"]["init_scale"] = init_scale
    path = tmp_path / "amp_fp16.json"
    path.write_text(json.dumps(ds))
    return str(path)


def rows_by_step(run_dir) -> dict:
    return {s["step"]: (s["loss"], s["loss_scale"], s["skipped_steps"]) for s in stats(run_dir)}


def test_amp_fp16_resume_restores_its_loss_scale_bitwise(tmp_path):
    overrides = ["engine.precision=amp_fp16", f"engine.ds_config={amp_ds_config(tmp_path, 2.0**19)}",
                 "train.steps=8", "train.ckpt_every=3", "optim.lr=1e-3"]
    whole = train(tmp_path, "whole", overrides)
    assert whole.returncode == 0, whole.stdout[-4000:]
    expected = rows_by_step(tmp_path / "whole")
    # from 2^19 the first steps overflow (this model's gradients fit from 2^17): the scale at the step-3 checkpoint
    # is neither the configured start nor GradScaler's default 2^16, so a resume that lost it would show
    assert 0 < expected[3][2] < 3 and expected[3][1] not in (2.0**19, 2.0**16)

    proc = start(tmp_path, "killed", overrides)
    killed = tmp_path / "killed"
    wait_for_step(killed, 5, proc)
    kill_group(proc)  # resume falls back to the step-3 checkpoint and its GradScaler state
    assert list_tags(killed / "checkpoints") == ["step_0000003"] and max(s["step"] for s in stats(killed)) < 8
    again = train(tmp_path, "killed", overrides)
    assert again.returncode == 0 and "[resume] from" in again.stdout, again.stdout[-4000:]
    assert rows_by_step(tmp_path / "killed") == expected  # losses, loss scales and skip counts, bitwise


@pytest.mark.parametrize("precision, extra_env", [("fp16", FP16), ("amp_fp16", {})])
def test_fp16_divergence_stops_with_the_last_good_tag_and_saves_nothing_non_finite(tmp_path, precision, extra_env):
    """Stage a trains sanely and checkpoints every 2 steps; stage b's lr of 1e30 breaks the weights at its first
    step. Loss scaling sees overflows, not divergence, until the scale reaches its minimum or the weights that
    a checkpoint would hold are non-finite: the run stops with exit 3 and one line naming the last good tag."""
    stages = "train.stages=[{name: a, steps: 4}, {name: b, steps: 30, overrides: {optim.lr: 1.0e30}}]"
    proc = train(tmp_path, "div", [f"engine.precision={precision}", "train.log_every=20", "train.ckpt_every=2",
                                   "train.keep_last=2", stages], **extra_env)
    assert proc.returncode == 3, proc.stdout[-3000:]
    run = tmp_path / "div"
    assert list_tags(run / "checkpoints") == ["step_0000002", "step_0000004"]
    assert all(check_tag(run / "checkpoints" / t) is None for t in list_tags(run / "checkpoints"))
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step_0000004'}" in proc.stdout
    assert "Traceback" not in proc.stdout and "already at minimum" not in proc.stdout


def test_amp_fp16_loss_scale_survives_a_reshard_to_one_rank(tmp_path):
    """A 2-rank amp_fp16 run resumed on 1 rank goes through a universal checkpoint (training/checkpoint/reshard):
    torch's GradScaler state rides in DeepSpeed's client state, which that conversion must not drop, or the
    resumed run would restart from the configured scale and overflow its way down again."""
    overrides = ["engine.precision=amp_fp16", f"engine.ds_config={amp_ds_config(tmp_path, 2.0**19)}",
                 "train.ckpt_every=3", "optim.lr=1e-3"]
    first = train(tmp_path, "r", [*overrides, "train.steps=3"])
    assert first.returncode == 0, first.stdout[-4000:]
    saved = rows_by_step(tmp_path / "r")[3]
    assert saved[1] not in (2.0**19, 2.0**16) and saved[2] > 0  # lowered by overflows: a lost state would show
    again = train(tmp_path, "r", [*overrides, "train.steps=5"], ranks=1)
    assert again.returncode == 0 and "resharded to 1 ranks" in again.stdout, again.stdout[-4000:]
    resumed = rows_by_step(tmp_path / "r")
    # no overflow after the checkpoint (the scale fits from 2^17) and no growth before 2000 good steps: unchanged
    assert resumed[4][1] == saved[1] and resumed[5][1] == saved[1]
    assert resumed[4][2] == saved[2]  # and the skipped-step count carries on
