"""Schedules: the mask ratio over a stage, and the fp32 EMA updated from half-precision weights."""
import numpy as np
import torch

from maskdit_ds.diffusion.schedules import ema_update, mask_ratio_at


def test_mask_ratio_schedules():
    assert mask_ratio_at(0.5, "constant", 0.7) == 0.5
    assert mask_ratio_at(0.5, "cosine", 0.0) == 0.5 and abs(mask_ratio_at(0.5, "cosine", 1.0)) < 1e-12
    assert abs(mask_ratio_at(0.5, "cosine", 0.5) - 0.5 * np.cos(np.pi / 4) ** 4) < 1e-12


def test_ema_update_in_fp32_from_half_weights():
    ema, model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).half()
    before = [p.clone() for p in ema.parameters()]
    ema_update(ema, model, 0.9)
    for b, e, m in zip(before, ema.parameters(), model.parameters()):
        assert e.dtype == torch.float32 and torch.allclose(e, 0.9 * b + 0.1 * m.float())


