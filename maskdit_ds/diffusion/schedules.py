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
    """ema <- decay * ema + (1 - decay) * model, accumulated in the EMA's fp32 parameters: the EMA of a plain
    (non-ZeRO) training loop, exact when `model` holds fp32 weights. Training under DeepSpeed follows the fp32
    masters instead (training/ema.py): the EMA of a rounded half copy is not the EMA of the weights."""
    ema_params, params = list(ema.parameters()), [p.detach() for p in model.parameters()]
    for start in range(0, len(params), 64):  # foreach kernels over groups: few launches, bounded fp32 copies
        chunk = [p.float() for p in params[start:start + 64]]  # no copy when the model is fp32 already
        torch._foreach_lerp_(ema_params[start:start + 64], chunk, 1.0 - decay)
