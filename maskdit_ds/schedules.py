"""Pure schedule functions (mask ratio per stage progress) and the EMA update."""
from __future__ import annotations

import math

import torch


def mask_ratio_at(ratio: float, schedule: str, progress: float, power: int = 4) -> float:
    """constant: ratio; cosine: ratio * cos(pi/2 t)^power, t = progress in [0, 1] through the stage."""
    if schedule == "constant":
        return ratio
    if schedule == "cosine":
        return ratio * math.cos(math.pi / 2 * min(max(progress, 0.0), 1.0)) ** power
    raise ValueError(f"unknown mask schedule {schedule!r}")


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, accumulated in the EMA's fp32 parameters.

    Under fp16/bf16 ZeRO the EMA follows the half-precision module copy that every rank holds in full. Following
    the fp32 masters instead would need an all-gather of the ZeRO partitions every step; the copy's rounding error
    (2^-11 relative for fp16) is unbiased and averages out over the EMA's 1/(1 - decay) step window.
    """
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().float(), 1.0 - decay)
