"""The MaskDM presets resolve, and the image presets need a data path."""

import pytest

from maskdit_ds.config import ConfigError, load_config, validate


# ---------------------------------------------------------------- presets (no launch)


def test_digits_presets_resolve(tmp_path):
    pre = load_config("maskdm_digits_pretrain")
    validate(pre, world_size=2)
    assert pre.mask.strategy == "block" and 0.75 <= pre.mask.ratio <= 0.9 and pre.train.stages == []
    assert pre.data.classes == [0, 1, 2, 3, 4] and pre.data.source == "digits"
    fine = load_config("maskdm_digits_finetune", [f"train.init_from={tmp_path}"])
    validate(fine, world_size=2)
    assert fine.mask.ratio == 0.0 and fine.data.classes == [5, 6, 7, 8, 9] and fine.data.fraction == 0.1
    assert fine.train.reset_ema and fine.model == pre.model  # same network, so the weights load strictly
    with pytest.raises(ConfigError, match="train.init_from"):  # no pre-training run yet: named error
        validate(load_config("maskdm_digits_finetune", ["train.init_from=/nonexistent/run"]))


def test_image_presets_need_a_data_path(tmp_path):
    (tmp_path / "faces").mkdir()
    for name in ("maskdm_pretrain", "maskdm_finetune"):
        with pytest.raises(ConfigError, match="data.path"):
            validate(load_config(name, [f"train.init_from={tmp_path}"]), world_size=1)
        cfg = load_config(name, [f"data.path={tmp_path}", f"train.init_from={tmp_path}"])
        validate(cfg, world_size=1)
        assert cfg.data.source == "images" and cfg.model.in_channels == 3
        assert 64 <= cfg.data.resolution <= 256 and cfg.data.resolution == cfg.model.input_size
    pre, fine = load_config("maskdm_pretrain"), load_config("maskdm_finetune")
    assert pre.mask.ratio >= 0.75 and pre.mask.strategy == "block" and fine.mask.ratio == 0.0
    assert fine.train.init_from == "runs/maskdm_pretrain" and fine.model == pre.model


# ---------------------------------------------------------------- end to end, 2 ranks


