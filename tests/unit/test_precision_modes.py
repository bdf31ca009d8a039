"""engine.precision names what a step does: each mode's DeepSpeed sections, the refusal of a ds_config that
disagrees, and the dry run's description."""
import json

import pytest

from maskdit_ds import hardware
from maskdit_ds.config import ENGINE_PRECISIONS, load_config
from maskdit_ds.errors import ConfigError
from maskdit_ds.training.engine import AMP_SCALER_KEY, build_ds_config, ds_precision

TINY = ["model.name=MaskDiT-T/2", "train.stages=[]", "train.micro_batch=8", "train.global_batch=16"]


def ds_for(precision: str, *overrides) -> dict:
    return build_ds_config(load_config("digits", [*TINY, f"engine.precision={precision}", *overrides]), 2)


def test_the_config_lists_every_training_mode():
    assert ENGINE_PRECISIONS == ("auto", *hardware.TRAINING_MODES)


@pytest.mark.parametrize("precision, sections, absent", [
    ("amp_fp16", {"torch_autocast": {"enabled": True, "dtype": "float16", "lower_precision_safe_modules": []}},
     ("fp16", "bf16")),
    ("amp_bf16", {"torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}},
     ("fp16", "bf16", AMP_SCALER_KEY)),
    ("fp16", {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1}}, ("bf16", "torch_autocast", AMP_SCALER_KEY)),
    ("bf16", {"bf16": {"enabled": True}}, ("fp16", "torch_autocast", AMP_SCALER_KEY)),
    ("fp32", {}, ("fp16", "bf16", "torch_autocast", AMP_SCALER_KEY)),
])
def test_each_mode_produces_its_deepspeed_sections(precision, sections, absent):
    ds = ds_for(precision)
    for key, value in sections.items():
        assert ds[key] == value
    assert not set(absent) & set(ds)
    assert ds["zero_optimization"]["stage"] == 2 and ds_precision(ds) == precision
    # amp: an empty lower_precision_safe_modules keeps every gradient bucket in fp32, as the paper's DDP reduced
    assert ds.get("torch_autocast", {}).get("lower_precision_safe_modules", []) == []


def test_amp_fp16_scaler_defaults_are_torchs_gradscaler_with_a_floor():
    assert ds_for("amp_fp16")[AMP_SCALER_KEY] == {"init_scale": 65536.0, "growth_factor": 2.0,
                                                  "backoff_factor": 0.5, "growth_interval": 2000, "min_scale": 1.0}


def write(tmp_path, ds: dict) -> str:
    path = tmp_path / "engine.json"
    path.write_text(json.dumps(ds))
    return str(path)


@pytest.mark.parametrize("precision, ds, message", [
    ("amp_fp16", {"fp16": {"enabled": True}}, "engine.precision is amp_fp16 but .* enables fp16"),
    ("fp16", {"torch_autocast": {"enabled": True, "dtype": "float16"}}, "engine.precision is fp16 but .* amp_fp16"),
    ("amp_bf16", {"torch_autocast": {"enabled": True, "dtype": "float16"}}, "amp_bf16 but .* enables amp_fp16"),
    ("amp_fp16", {"torch_autocast": {"enabled": True, "dtype": "float16"}, "fp16": {"enabled": True}},
     "enables fp16 and torch_autocast"),
    ("amp_fp16", {"torch_autocast": {"enabled": True, "dtype": "float16"}, AMP_SCALER_KEY: {"init": 2}},
     "amp_grad_scaler has unknown keys \\['init'\\]"),
    ("bf16", {"bf16": {"enabled": True}, AMP_SCALER_KEY: {"init_scale": 2}}, "applies to amp_fp16 only, not bf16"),
])
def test_a_ds_config_that_disagrees_with_the_mode_is_refused(tmp_path, precision, ds, message):
    with pytest.raises(ConfigError, match=message):
        ds_for(precision, f"engine.ds_config={write(tmp_path, ds)}")


def test_dry_run_says_what_each_stage_runs_in(capsys):
    from maskdit_ds.training.plan import dry_run

    cfg = load_config("imagenet256_staged")
    assert dry_run(cfg, 8) == 0
    out = capsys.readouterr().out
    assert "precision amp_fp16: fp32 weights; forward under torch.autocast(fp16)" in out
    assert "torch's GradScaler" in out and "EMA of the fp32 masters" in out
    assert "precision fp32: fp32 throughout" in out  # the unmasked tuning stage
    assert '"torch_autocast": {"enabled": true, "dtype": "float16"' in out
