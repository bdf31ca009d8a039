"""The MaskDM two-stage recipe: a 2-rank masked pre-training feeds a 2-rank fine-tune on other classes."""
import json
import subprocess
import types
from pathlib import Path

import torch
from safetensors.torch import load_file

from maskdit_ds.model import build_denoiser

import launch as _launch

TINY = ["model.name=UViT-T/2", "train.grid_every=0", "train.log_every=1", "sample.final_samples=0",
        "data.num_workers=0", "train.global_batch=32", "train.micro_batch=16"]


def launch(out_dir: Path, config: str, overrides, timeout: int = 240) -> subprocess.CompletedProcess:
    name = config  # run.name = preset name, so init_from can use the preset's default layout
    proc = subprocess.run(_launch.command(out_dir, name, [*TINY, *overrides], ranks=2, config=config),
                          cwd=_launch.ROOT, env=_launch.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc


# ---------------------------------------------------------------- presets (no launch)


# ---------------------------------------------------------------- end to end, 2 ranks


def final_step_export(run_dir: Path) -> Path:
    exports = sorted((run_dir / "export").glob("step_*"))
    assert exports, f"no export in {run_dir}"
    return exports[-1]


def test_pretrain_then_finetune_on_other_classes(tmp_path):
    pre_steps, fine_steps = 3, 2
    launch(tmp_path, "maskdm_digits_pretrain", [f"train.steps={pre_steps}", f"train.ckpt_every={pre_steps}"])
    pre_dir = tmp_path / "maskdm_digits_pretrain"
    pre_stats = _launch.stats(pre_dir)
    assert pre_stats[-1]["step"] == pre_steps
    assert all(s["mask_ratio"] == 0.75 and s["mae"] > 0 for s in pre_stats)  # masked, MAE term active

    # The fine-tune uses another seed, so a fresh init would differ from the pre-trained weights everywhere.
    proc = launch(tmp_path, "maskdm_digits_finetune", [f"train.init_from={pre_dir}", f"train.steps={fine_steps}",
                                                        "run.seed=7"])
    fine_dir = tmp_path / "maskdm_digits_finetune"
    fine_stats = _launch.stats(fine_dir)
    assert [s["step"] for s in fine_stats] == [pre_steps + 1, pre_steps + 2]  # the step count continues
    assert all(s["mask_ratio"] == 0.0 and s["mae"] == 0.0 for s in fine_stats)
    assert "[init]" in proc.stdout

    lineage = json.loads((fine_dir / "lineage.json").read_text())
    assert Path(lineage["init_from"]).resolve().is_relative_to(pre_dir.resolve())
    assert lineage["step"] == pre_steps and lineage["ema"] == "reset"
    assert lineage["data"] == {"source": "digits", "path": "", "classes": [5, 6, 7, 8, 9], "fraction": 0.1}

    export = final_step_export(fine_dir)
    assert export.name == f"step_{pre_steps + fine_steps:07d}"
    meta = json.loads((export / "config.json").read_text())
    assert meta["step"] == pre_steps + fine_steps and meta["model"]["name"] == "UViT-T/2"
    assert Path(meta["lineage"]["init_from"]) == pre_dir
    assert meta["lineage"]["data"]["classes"] == [5, 6, 7, 8, 9] and meta["lineage"]["data"]["fraction"] == 0.1
    assert meta["lineage"] == lineage  # the export names the exact checkpoint and step, not just the run folder
    pre_meta = json.loads((final_step_export(pre_dir) / "config.json").read_text())
    assert pre_meta["lineage"]["init_from"] is None and pre_meta["lineage"]["data"]["classes"] == [0, 1, 2, 3, 4]

    # The weights were loaded: the fine-tuned EMA sits within a few optimizer steps of the pre-trained weights,
    # far closer than an independently initialised network is.
    pre_w = load_file(str(final_step_export(pre_dir) / "model.safetensors"))
    fine_w = load_file(str(export / "model.safetensors"))
    torch.manual_seed(123)
    cfg = types.SimpleNamespace(name="UViT-T/2", input_size=16, in_channels=1, num_classes=10, sigma_data=0.5)
    fresh = build_denoiser(cfg).state_dict()
    key = "model.x_embedder.proj.weight"  # Xavier-initialised: independent draws differ by ~0.2
    moved = (fine_w[key] - pre_w[key]).abs().max()
    apart = (fresh[key] - pre_w[key]).abs().mean()
    assert moved < 0.02 and apart > 10 * moved, (float(moved), float(apart))
