"""Resume that cannot be tricked: payloads planted in any file of a tag never run; divergence between log steps is
never checkpointed; a run with only unusable tags stops instead of starting over; a resume with another model or
data is refused with a diff before anything is written; a full disk is named, with the free space."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import ckpt_helpers as _ckpt_helpers
import launch as _launch
import repo as _repo
from maskdit_ds.errors import InputError
from maskdit_ds.model.export import EXPORT_WEIGHTS, step_folders
from maskdit_ds.training import checkpoint as ckpt
from maskdit_ds.training.engine import safe_loads, unsafe_file

RUN, FP16 = _ckpt_helpers.RUN_OVERRIDES, _ckpt_helpers.FP16
RunsAShellCommand, copy_run = _ckpt_helpers.RunsAShellCommand, _ckpt_helpers.copy_run
tool_command = _repo.tool_command


def plant(tag_dir, name, marker):
    """Replace one file of a tag by a payload and fix complete.json up (sizes and sha256), as an attacker who
    can write the folder would: only the safe loader stands in the way."""
    target = tag_dir / name
    if name.endswith(".pt"):
        torch.save({"module": RunsAShellCommand(marker)}, target)
    else:  # a pickle where safetensors belong
        torch.save({"w": RunsAShellCommand(marker)}, target)
    meta = {k: v for k, v in json.loads((tag_dir / ckpt.MANIFEST).read_text()).items() if k not in ("files", "sha256")}
    (tag_dir / ckpt.MANIFEST).unlink()
    ckpt.write_manifest(tag_dir, meta)


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                  "zero_pp_rank_1_mp_rank_00_optim_states.pt", "train_state_rank001.pt",
                                  "ema.safetensors"])
def test_payload_in_any_file_of_a_tag_is_refused_with_the_tag_named(tmp_path, name):
    run, marker = copy_run(tmp_path), tmp_path / "pwned"
    plant(run / "checkpoints" / "step_0000002", name, marker)
    warnings = []
    assert ckpt.latest_good_tag(run / "checkpoints", warn=warnings.append, verify_loads=unsafe_file) == \
        "step_0000001"
    assert len(warnings) == 1 and "step_0000002" in warnings[0] and name in warnings[0]
    assert not marker.exists()


def test_deepspeed_loads_are_forced_to_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"x": RunsAShellCommand(marker)}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="Weights only load failed"), safe_loads():
        torch.load(tmp_path / "evil.pt", weights_only=False)  # what DeepSpeed's checkpoint engine passes
    assert not marker.exists() and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    for tag in ("step_0000001", "step_0000002"):  # real tags of every precision-independent kind load
        assert unsafe_file(_ckpt_helpers.trained_run() / "checkpoints" / tag) is None


def test_tampered_tag_on_resume_init_from_and_conversion_runs_nothing(tmp_path):
    run, marker = copy_run(tmp_path), tmp_path / "pwned"
    plant(run / "checkpoints" / "step_0000002", "mp_rank_00_model_states.pt", marker)
    resumed = _launch.train(tmp_path, "r", RUN, ranks=2, **FP16)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "skipping" in resumed.stdout and "refused by the safe loader" in resumed.stdout
    assert f"[resume] from {run / 'checkpoints' / 'step_0000001'}" in resumed.stdout
    plant(run / "checkpoints" / "step_0000002", "mp_rank_00_model_states.pt", marker)  # it was re-saved
    tampered = run / "checkpoints" / "step_0000002"
    started = _launch.train(tmp_path, "other", [*RUN, f"train.init_from={tampered}"], ranks=1, **FP16)
    assert started.returncode == 2 and f"train.init_from: {tampered} is not a usable checkpoint" in started.stdout
    converted = subprocess.run(tool_command("convert_checkpoint", "zero", tampered, "--out", tmp_path / "out",
                                            "--weights", "model"), capture_output=True, text=True, timeout=120,
                               env=_launch.env())
    assert converted.returncode == 2 and "refused by the safe loader" in converted.stderr, converted.stderr[-2000:]
    assert not marker.exists()


def test_tampered_export_cannot_run_code(tmp_path):
    import maskdit_ds

    export = tmp_path / "export"
    shutil.copytree(_ckpt_helpers.trained_run() / "export" / "step_0000002", export)
    marker = tmp_path / "pwned"
    torch.save({"w": RunsAShellCommand(marker)}, export / EXPORT_WEIGHTS)
    with pytest.raises(InputError, match=f"{export / EXPORT_WEIGHTS}: not a readable safetensors file"):
        maskdit_ds.load_pretrained(export)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ divergence


def test_divergence_between_log_steps_is_never_checkpointed(tmp_path):
    """Stage a trains sanely and checkpoints every 2 steps; stage b's lr of 1e30 breaks the weights at its first
    step. Logging every 20 steps would have seen nothing: the per-step check stops the run at the first
    non-finite step, before its checkpoint, and names the last good tag."""
    stages = ("train.stages=[{name: a, steps: 4}, {name: b, steps: 10, overrides: {optim.lr: 1.0e30}}]")
    proc = _launch.train(tmp_path, "div", ["engine.precision=fp32", "train.log_every=20", "train.ckpt_every=2",
                                           "train.keep_last=2", stages])
    assert proc.returncode == 3, proc.stdout[-3000:]
    run = tmp_path / "div"
    assert ckpt.list_tags(run / "checkpoints") == ["step_0000002", "step_0000004"]
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step_0000004'}" in proc.stdout
    assert "step 6: non-finite loss or gradient norm" in proc.stdout
    assert all(ckpt.check_tag(run / "checkpoints" / t) is None for t in ckpt.list_tags(run / "checkpoints"))


@pytest.mark.parametrize("override, message", [
    ("optim.lr=inf", "optim.lr: inf is not a finite number"), ("optim.lr=0", "optim.lr: 0.0 must be positive"),
    ("optim.lr=nan", "optim.lr: nan is not a finite number"),
    ("train.ema_decay=1.0", "train.ema_decay: 1.0 must be in [0, 1)")])
def test_absurd_values_are_config_errors(override, message):
    from maskdit_ds.config import ConfigError, load_config, validate

    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        validate(load_config("digits", [override]))


# ------------------------------------------------------------------------------------------------ never start over


def test_when_every_tag_is_unusable_the_run_stops_and_keeps_them(tmp_path):
    run = copy_run(tmp_path)
    for tag in ("step_0000001", "step_0000002"):
        victim = run / "checkpoints" / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        os.truncate(victim, victim.stat().st_size // 2)
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    proc = _launch.train(tmp_path, "r", RUN, ranks=2, **FP16)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "holds checkpoints but none is usable (step_0000002: zero_pp_rank_0" in proc.stdout
    assert "step_0000001: zero_pp_rank_0" in proc.stdout and "train.resume=never" in proc.stdout
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before  # nothing touched
    again = _launch.train(tmp_path, "r", [*RUN, "train.resume=never"], ranks=2, **FP16)
    assert again.returncode == 0, again.stdout[-3000:]
    archived = list((run / "archive").glob("*/checkpoints/step_0000002"))
    assert len(archived) == 1 and (archived[0] / "zero_pp_rank_0_mp_rank_00_optim_states.pt").read_bytes() == \
        before[run / "checkpoints" / "step_0000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert [s["step"] for s in _launch.stats(run)] == [1, 2]  # a fresh start, its own stats


# ------------------------------------------------------------------------------------------------ config check


def test_resume_with_another_model_or_data_is_refused_with_a_diff(tmp_path):
    run = copy_run(tmp_path)
    config_before = (run / "config.yaml").read_bytes()
    proc = _launch.train(tmp_path, "r", [*RUN, "model.name=UViT-T/2", "data.classes=[1,2]"], ranks=2, **FP16)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "data.classes: [] -> [1, 2]" in proc.stdout and "model.name: 'MaskDiT-T/2' -> 'UViT-T/2'" in proc.stdout
    assert (run / "config.yaml").read_bytes() == config_before  # checked before anything was written
    sigma = _launch.train(tmp_path, "r", [*RUN, "model.sigma_data=0.6"], ranks=2, **FP16)
    assert sigma.returncode == 2 and "model.sigma_data: 0.5 -> 0.6" in sigma.stdout
    allowed = _launch.train(tmp_path, "r", [*RUN, "model.sigma_data=0.6", "train.steps=3", "train.log_every=3",
                                            "train.allow_config_change=[model.sigma_data]"], ranks=2, **FP16)
    assert allowed.returncode == 0, allowed.stdout[-3000:]
    assert "warning: train.allow_config_change lets model.sigma_data: 0.5 -> 0.6" in allowed.stdout
    assert "config changed: train.log_every: 1 -> 3" in allowed.stdout
    assert (run / "config.prev.yaml").read_bytes() == config_before


# ------------------------------------------------------------------------------------------------ disk full

NO_SPACE = r"""
import errno, sys
import maskdit_ds.training.checkpoint.tags as tags
real = tags.save_rank_state
def full_disk(tag_dir, rank, state):  # the disk fills up during the second checkpoint
    if state["train"]["step"] >= 4:
        raise OSError(errno.ENOSPC, "No space left on device", str(tag_dir))
    real(tag_dir, rank, state)
tags.save_rank_state = full_disk
from maskdit_ds.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_disk_full_names_the_path_and_keeps_earlier_tags(tmp_path):
    cmd = [sys.executable, "-c", NO_SPACE, "train", "--config", "digits", f"run.out_dir={tmp_path}", "run.name=full",
           *_launch.TINY, "train.steps=6", "train.ckpt_every=2"]
    proc = subprocess.run(cmd, cwd=_launch.ROOT, env=_launch.env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    run = tmp_path / "full"
    assert proc.returncode == 4, proc.stdout[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("storage error:"))
    assert f"could not write checkpoint {run / 'checkpoints' / 'step_0000004'}: no space left on device" in line
    assert "GiB free of" in line
    assert ckpt.list_tags(run / "checkpoints") == ["step_0000002"]  # the partial tag is gone, the earlier kept
    assert ckpt.check_tag(run / "checkpoints" / "step_0000002", verify_hashes=True) is None


def test_stale_temporaries_are_cleaned_and_never_pruned_as_exports(tmp_path):
    run = tmp_path / "r"
    (run / "export" / "step_0000004.tmp1234").mkdir(parents=True)
    (run / "export" / "step_0000002").mkdir()
    (run / "checkpoints" / "step_0000002").mkdir(parents=True)
    (run / "checkpoints" / "step_0000002" / "ema.safetensors.tmp99").write_text("x")
    (run / "config.tmp").write_text("kept: not ours")
    assert [p.name for p in step_folders(run / "export")] == ["step_0000002"]
    removed = ckpt.clean_stale_temporaries(run)
    assert sorted(p.name for p in removed) == ["ema.safetensors.tmp99", "step_0000004.tmp1234"]
    assert (run / "config.tmp").exists() and (run / "export" / "step_0000002").exists()
