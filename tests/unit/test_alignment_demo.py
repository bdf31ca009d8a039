"""The alignment demonstration's pieces (tools/alignment_demo.py, tools/train_digits_teacher.py): arms at equal
training compute, and a digits teacher that learns the classes and loads through the training's teacher loader."""
import json
from pathlib import Path

import torch

from maskdit_ds.data.digits import load_digits_arrays, upscale
from maskdit_ds.model.teacher import load_teacher
from repo import tool


def test_every_arm_gets_the_same_training_flops():
    demo = tool("alignment_demo")
    arms = demo.plan(600, teacher=(2.0e6, 64))  # forward FLOPs, feature width
    totals = [arm["total_tflops"] for arm in arms.values()]
    # step counts are rounded to whole steps: within one step's FLOPs (< 0.2% of 480 steps) of each other
    assert max(totals) / min(totals) < 1.002
    per_step = {name: arm["gflops_per_image_first_stage"] for name, arm in arms.items()}
    assert per_step["masked-0.5"] < per_step["masked-0.5+align"] < per_step["unmasked"]
    assert arms["unmasked"]["first_stage_steps"] < arms["masked-0.5+align"]["first_stage_steps"] \
        < arms["masked-0.5"]["first_stage_steps"] < arms["block-0.75+align"]["first_stage_steps"]
    assert {arm["tuning_steps"] for arm in arms.values()} == {120}  # 20% of the budget, unmasked
    aligned = demo.overrides("masked-0.5+align", arms["masked-0.5+align"], 1, Path("/t"), Path("/o"), 10)
    assert "loss.align_teacher=/t" in aligned and "run.seed=1" in aligned
    stages = json.loads(next(o for o in aligned if o.startswith("train.stages="))[len("train.stages="):])
    assert stages[0]["overrides"]["loss.align_weight"] == 0.5 and stages[1]["overrides"]["loss.align_weight"] == 0


def test_the_digits_teacher_learns_the_classes_and_loads_as_a_teacher(tmp_path):
    teacher_tool = tool("train_digits_teacher")
    assert teacher_tool.main(["--out", str(tmp_path / "t"), "--width", "32", "--depth", "1", "--heads", "2",
                              "--epochs", "20"]) == 0
    record = json.loads((tmp_path / "t" / "teacher.json").read_text())
    assert record["held_out_accuracy"] > 0.4  # chance 0.1; 0.69 measured (20 epochs, 1 layer): room for other CPUs
    teacher = load_teacher(str(tmp_path / "t"), resolution=8, grid=4, device=torch.device("cpu"))
    images, _ = load_digits_arrays()
    x = upscale(torch.from_numpy(images[:6]), 8)  # (6, 1, 8, 8) in [-1, 1], what the denoiser trains on
    features = teacher(x)
    assert features.shape == (6, 16, 32) and torch.isfinite(features).all()
    assert not any(p.requires_grad for p in teacher.parameters())
