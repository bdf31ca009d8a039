"""Alignment settings in the run config: off by default, REPA's constants in the preset, errors that name the key,
and per-stage switching limited to what a stage may change."""
import pytest

from maskdit_ds.config import aligns, expand_stages, load_config, resolve_auto, validate
from maskdit_ds.errors import ConfigError


def test_off_by_default_with_repas_constants_as_the_preset():
    assert not aligns(expand_stages(load_config("digits")))
    assert not aligns(expand_stages(load_config("imagenet256_staged")))
    cfg = load_config("imagenet256_aligned")
    loss = cfg.loss
    assert aligns(expand_stages(cfg)) and (loss.align_weight, loss.align_depth, loss.align_proj_dim) == (0.5, 8, 2048)
    assert (loss.align_teacher, loss.align_teacher_resolution) == ("facebook/dinov2-base", 224)
    masked, tuning = (stage.cfg.loss.align_weight for stage in expand_stages(cfg))
    assert (masked, tuning) == (0.5, 0.0)  # aligned masked phase, unmasked tuning without it
    validate(resolve_auto(cfg)[0], 8, check_paths=False)


@pytest.mark.parametrize("override,message", [
    ("loss.align_depth=5", r"loss.align_depth: 5 must be in \[1, 4\], the encoder blocks of MaskDiT-Digits/2"),
    ("loss.align_weight=-1", "loss.align_weight: -1.0 must be >= 0"),
    ("loss.align_until_step=-3", "loss.align_until_step: -3 must be >= 0"),
    ("loss.align_proj_dim=0", "loss.align_proj_dim: 0 must be positive"),
    ("loss.align_teacher=", "loss.align_teacher: required"),
])
def test_bad_alignment_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config("digits", ["loss.align_weight=0.5", "loss.align_depth=2", override,
                                        "engine.precision=fp32"]))


def test_a_run_aligns_when_any_stage_does():
    cfg = load_config("digits", ["train.stages.0.overrides={loss.align_weight: 0.5}", "loss.align_depth=2"])
    assert aligns(expand_stages(cfg))
    validate(resolve_auto(cfg)[0])  # the run-level depth 2 is checked in the aligned stage


def test_a_stage_may_switch_alignment_but_not_reshape_the_projector():
    ok = load_config("digits", ["loss.align_weight=0.5", "loss.align_depth=2",
                                "train.stages.1.overrides={mask.ratio: 0.0, loss.align_weight: 0.0, "
                                "loss.align_until_step: 10}"])
    validate(resolve_auto(ok)[0])
    bad = load_config("digits", ["loss.align_weight=0.5", "loss.align_depth=2",
                                 "train.stages.1.overrides={mask.ratio: 0.0, loss.align_depth: 1}"])
    with pytest.raises(ConfigError, match=r"train.stages\[1\] \(unmasked-tuning\): loss.align_depth shape the"):
        validate(resolve_auto(bad)[0])


def test_agreement_checks_are_for_the_digits_only():
    with pytest.raises(ConfigError, match="eval.agreement_every: the class-agreement judge knows only"):
        validate(load_config("imagenet256", ["eval.agreement_every=100"]), 8, check_paths=False)
    validate(resolve_auto(load_config("digits", ["eval.agreement_every=100"]))[0])
