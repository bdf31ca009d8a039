"""Conversion of our ZeRO tags of a real 2-rank fp16 run: the export equals DeepSpeed's own zero_to_fp32."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import ckpt_helpers as _ckpt_helpers
from maskdit_ds import load_pretrained
from maskdit_ds.convert import (ConversionError, convert_zero)
from repo import tool_command


# ---------------------------------------------------------------- the released layout, written out independently


# ---------------------------------------------------------------- DiT as encoder


# ---------------------------------------------------------------- Hub folder


# ---------------------------------------------------------------- ZeRO tags of a real 2-rank fp16 run


def test_zero_tag_matches_deepspeed_zero_to_fp32(tmp_path):
    run = _ckpt_helpers.trained_run()
    tag = run / "checkpoints" / "step_0000002"
    proc = subprocess.run(tool_command("convert_checkpoint", "zero", tag, "--out", tmp_path / "x", "--weights", "both"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("[convert] zero") == 2 and "saved on 2 ranks" in proc.stdout, proc.stdout
    # DeepSpeed's own script, as every run leaves it next to its tags.
    proc = subprocess.run([sys.executable, str(run / "checkpoints" / "zero_to_fp32.py"), str(run / "checkpoints"),
                           str(tmp_path / "ds"), "--safe_serialization", "-t", tag.name],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    deepspeed_fp32 = load_file(str(tmp_path / "ds" / "model.safetensors"))
    ours = load_file(str(tmp_path / "x" / "model" / "model.safetensors"))
    assert ours.keys() == deepspeed_fp32.keys()
    assert all(torch.equal(ours[k], deepspeed_fp32[k]) for k in ours)
    ema = load_file(str(tag / "ema.safetensors"))
    got_ema = load_file(str(tmp_path / "x" / "ema" / "model.safetensors"))
    assert all(torch.equal(got_ema[k], ema[k]) for k in ema) and got_ema.keys() == ema.keys()
    # The fp16 module copy saved by DeepSpeed is the masters rounded: the export holds the fp32 masters.
    module = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert all(torch.equal(module[k], ours[k].half()) for k in ours)
    config = json.loads((tmp_path / "x" / "model" / "config.json").read_text())
    assert config["model"]["name"] == "MaskDiT-T/2" and config["step"] == 2 and config["weights"] == "model"
    assert config["source"]["world_size"] == 2
    load_pretrained(tmp_path / "x" / "model"), load_pretrained(tmp_path / "x" / "ema")


def test_zero_refuses_an_incomplete_tag(tmp_path):
    tag = tmp_path / "run" / "checkpoints" / "step_0000001"
    tag.mkdir(parents=True)
    with pytest.raises(ConversionError, match="no complete.json"):
        convert_zero(tag, tmp_path / "out")
