"""Aligned training for real on 2 CPU ranks (docs/alignment.md): the term is logged while it is on and gone after
align_until_step and in a stage that switches it off; checkpoints keep the projector, exports do not; a killed
run resumes to exactly the uninterrupted losses, alignment and device-hours included."""
import json

import pytest
import torch
from launch import kill_group, start, stats, train, wait_for_step
from safetensors.torch import load_file
from teacher_helpers import save_tiny_teacher

from maskdit_ds.config import load_config
from maskdit_ds.model import build_denoiser, load_pretrained


def aligned(teacher):
    # TINY is 16 px (MaskDiT-T/2: an 8x8 token grid); the teacher sees the 16 px digits as 8x8 patches of 2 px.
    # Steps 0 and 1 align (until_step 2), step 2 (still stage a) does not, stage b switches it off.
    return ["loss.align_weight=0.5", "loss.align_depth=2", "loss.align_proj_dim=32", f"loss.align_teacher={teacher}",
            "loss.align_teacher_resolution=16", "loss.align_until_step=2", "mask.ratio=0.5", "optim.lr=1e-3",
            "train.ckpt_every=2", "eval.agreement_every=5", "eval.agreement_samples=4",
            "train.stages=[{name: a, steps: 3}, {name: b, steps: 2, "
            "overrides: {mask.ratio: 0.0, loss.align_weight: 0.0}}]"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("t") / "teacher", image_size=16, mean=[0.5], std=[0.5])


@pytest.fixture(scope="module")
def whole(tmp_path_factory, teacher):
    out = tmp_path_factory.mktemp("runs")
    proc = train(out, "whole", aligned(teacher))
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "[align] teacher" in proc.stdout
    return out / "whole"


def rows(run_dir):
    return {s["step"]: s for s in stats(run_dir) if "loss" in s}  # later lines (after a resume) win


def test_the_term_is_logged_while_on_and_gone_when_switched_off(whole):
    by_step = rows(whole)
    assert sorted(by_step) == [1, 2, 3, 4, 5]
    assert all(0 < by_step[s]["align"] < 2 for s in (1, 2))  # 1 - cos lies in [0, 2]
    assert all("align" not in by_step[s] for s in (3, 4, 5))  # past until_step, then the stage without it
    hours = [by_step[s]["device_hours"] for s in sorted(by_step)]
    assert hours[0] > 0 and hours == sorted(hours)
    quality = [s for s in stats(whole) if "digits_class_agreement" in s]
    assert len(quality) == 1 and quality[0]["step"] == 5 and quality[0]["device_hours"] >= hours[-1]
    assert 0 <= quality[0]["digits_class_agreement"] <= 1


def test_checkpoints_keep_the_projector_and_exports_drop_it(whole):
    tag = whole / "checkpoints" / "step_0000005"
    module = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert any(k.startswith("projector.") for k in module) and any(k.startswith("denoiser.") for k in module)
    cfg = load_config("digits", ["model.name=MaskDiT-T/2", "model.input_size=16"])
    exported = load_file(str(whole / "export" / "step_0000005" / "model.safetensors"))
    assert set(exported) == set(build_denoiser(cfg.model).state_dict())
    meta = json.loads((whole / "export" / "step_0000005" / "config.json").read_text())
    assert meta["device_hours"] > 0 and meta["images_seen"] == 5 * 16
    net = load_pretrained(whole)  # what sampling uses: no projector needed
    assert net(torch.randn(1, 1, 16, 16), 1.0, torch.tensor([3])).shape == (1, 1, 16, 16)


def test_a_killed_aligned_run_resumes_exactly(whole, teacher, tmp_path):
    proc = start(tmp_path, "killed", aligned(teacher))
    wait_for_step(tmp_path / "killed", 3, proc)
    kill_group(proc)  # resume falls back to the step-2 checkpoint: projector, optimizer and loader position
    saved = torch.load(tmp_path / "killed" / "checkpoints" / "step_0000002" / "train_state_rank000.pt",
                       weights_only=True)["train"]["device_hours"]
    again = train(tmp_path, "killed", aligned(teacher))
    assert again.returncode == 0 and "[resume] from" in again.stdout, again.stdout[-4000:]
    resumed, reference = rows(tmp_path / "killed"), rows(whole)
    for key in ("loss", "dsm", "mae", "align"):
        assert {s: r.get(key) for s, r in resumed.items()} == {s: r.get(key) for s, r in reference.items()}, key
    # device-hours continue from the checkpoint's count (the killed attempt's step 3 is not counted twice)
    assert resumed[2]["device_hours"] <= saved < resumed[3]["device_hours"] < resumed[5]["device_hours"]
    a = load_file(str(tmp_path / "killed" / "export" / "step_0000005" / "model.safetensors"))
    b = load_file(str(whole / "export" / "step_0000005" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)
