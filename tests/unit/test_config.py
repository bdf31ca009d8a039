"""Config loading, overrides and validation errors that name the key; presets pass --dry-run."""
import json

import pytest

from maskdit_ds.config import ConfigError, load_config, resolve_auto, validate
from maskdit_ds.training.engine import build_ds_config
from maskdit_ds.training import describe


def test_overrides_are_typed_and_nested():
    cfg = load_config("digits", ["train.micro_batch=32", "optim.lr=2e-4", "run.name=123", "data.classes=[1,2]"])
    assert cfg.train.micro_batch == 32 and cfg.optim.lr == 2e-4 and cfg.run.name == "123"
    assert cfg.data.classes == [1, 2]


@pytest.mark.parametrize("override,message", [
    ("train.micro_batchx=3", "unknown config key 'train.micro_batchx'"),
    ("train.micro_batch=abc", "train.micro_batch: expected int"),
    ("mask.ratio=1.0", "mask.ratio"),
    ("train.global_batch=100", "train.global_batch: 100 is not divisible"),
    ("model.name=MaskDiT-Q/2", "model.name: unknown model"),
    ("engine.precision=fp8", "engine.precision"),
    ("mask.strategy=stripes", "mask.strategy"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate(load_config("digits", [override, "train.stages=[]", "train.steps=10"]), world_size=1)


def test_missing_paths_are_errors_before_start_and_warnings_in_dry_run(tmp_path):
    cfg = load_config("imagenet256", [f"data.path={tmp_path}/nope"])
    with pytest.raises(ConfigError, match="data.path"):
        validate(cfg, world_size=8)
    assert any("data.path" in w for w in validate(cfg, world_size=8, check_paths=False))


def test_stage_errors_name_the_stage():
    cfg = load_config("digits", ["train.stages=[{name: a, steps: 5, overrides: {mask.ratio: 2.0}}]"])
    with pytest.raises(ConfigError, match=r"train.stages\[0\] \(a\): mask.ratio"):
        validate(cfg)


def test_ds_config_that_sets_hyperparameters_is_rejected(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": 2}}))
    cfg = load_config("digits", [f"engine.ds_config={bad}", "engine.precision=fp32"])
    with pytest.raises(ConfigError, match="train_batch_size"):
        build_ds_config(cfg, 1)


def test_ds_config_gets_batch_and_optimizer_from_run_config():
    cfg = load_config("digits", ["engine.precision=fp32", "train.global_batch=64", "train.micro_batch=16"])
    ds = build_ds_config(cfg, 2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (64, 16, 2)
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.999] and ds["optimizer"]["params"]["weight_decay"] == 0
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 0.0


@pytest.mark.parametrize("preset,world", [("imagenet256", 8), ("imagenet256_tune", 8), ("imagenet512", 32),
                                          ("imagenet512_tune", 32), ("imagenet256_staged", 8), ("digits", 2)])
def test_presets_pass_dry_run(preset, world):
    cfg = resolve_auto(load_config(preset))[0]
    validate(cfg, world, check_paths=False)
    text = describe(cfg, world)
    assert "parameters:" in text and "training GFLOPs per image" in text


def test_imagenet_presets_follow_the_recipe():
    masked, tune = load_config("imagenet256"), load_config("imagenet256_tune")
    assert (masked.mask.ratio, masked.engine.precision, masked.optim.lr, masked.train.global_batch) == \
        (0.5, "amp_fp16", 1e-4, 1024)
    assert (tune.mask.ratio, tune.engine.precision, tune.optim.lr, tune.train.global_batch) == \
        (0.0, "fp32", 5e-5, 512)
    assert load_config("imagenet512").model.input_size == 64 and masked.train.ema_decay == 0.9999


def test_indexed_overrides_update_one_stage():
    default = load_config("digits")
    cfg = load_config("digits", ["train.stages.0.steps=20"])
    assert cfg.train.stages[0]["steps"] == 20 and cfg.train.stages[1] == default.train.stages[1]
    with pytest.raises(ConfigError, match=r"train.stages.5: index out of range"):
        load_config("digits", ["train.stages.5.steps=1"])


def test_overrides_keep_digit_strings_for_text_keys():
    digits = "0" * 60 + "1234"
    cfg = load_config("digits", [f"eval.inception_sha256={digits}", "run.name=0042", "train.steps=0100",
                                 "optim.lr=5e-5"])
    assert cfg.eval.inception_sha256 == digits and cfg.run.name == "0042"
    assert cfg.train.steps == 100 and cfg.optim.lr == 5e-5


def test_example_ema_forgets_the_zero_init():
    # An EMA that still holds the zero-initialised output layer samples noise (seen at decay 0.999 over 750 steps).
    cfg = load_config("digits")
    steps = sum(stage["steps"] for stage in cfg.train.stages)
    assert cfg.train.ema_decay**steps < 0.01


def test_a_short_run_with_a_slow_ema_is_warned_about():
    warnings = validate(load_config("digits", ["train.ema_decay=0.999"]))
    assert any(w.startswith("train.ema_decay: 0.999 over 1000 steps leaves 37%") for w in warnings)
    assert not any("ema_decay" in w for w in validate(load_config("digits")))
    tune = load_config("imagenet256_tune", ["train.init_from=/tmp", "train.steps=10"])
    assert not any("ema_decay" in w for w in validate(tune, 8, check_paths=False))  # the EMA continues


# ------------------------------------------------------------------------------------------------ the CLI's errors


def run_cli(capsys, *argv):
    from maskdit_ds.__main__ import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_yaml_syntax_error_is_one_line_naming_file_and_position(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  name: x\nmodel: [unclosed\n")
    code, _, err = run_cli(capsys, "train", "--config", str(bad), "--dry-run")
    assert code == 2
    assert err.strip().count("\n") == 0 and err.startswith(f"config error: {bad}: not valid YAML: line 4, column 1")


@pytest.mark.parametrize("override, message", [
    ("optim.betas=[0.9", "override 'optim.betas=[0.9': the value is not valid YAML (line 1, column 5"),
    ("trainsteps", "override 'trainsteps' must look like section.key=value"),
])
def test_malformed_override_is_one_line_naming_it(capsys, override, message):
    code, _, err = run_cli(capsys, "train", "--config", "digits", override, "--dry-run")
    assert code == 2 and err.strip().count("\n") == 0 and err.startswith(f"config error: {message}")


def test_dry_run_and_options_stand_anywhere_among_overrides(capsys):
    code, out, _ = run_cli(capsys, "train", "train.micro_batch=32", "--dry-run", "optim.lr=2e-4", "--config",
                           "digits", "--world-size", "2", "run.name=anywhere")
    assert code == 0
    assert "micro_batch: 32" in out and "lr: 0.0002" in out and "name: anywhere" in out and "world size: 2" in out
    assert "precision: engine.precision: auto -> " in out  # the resolved precision and its reason
    with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error
        run_cli(capsys, "train", "--config", "digits", "--dry-rum")
