"""Shared by the model tests: which input patches a network's output depends on."""
from __future__ import annotations

import torch


def patch_sensitivity(trunk, x, c_noise, y_onehot, patch: int, record=None) -> torch.Tensor:
    """(N, L) per sample and patch (raster order): the size of the gradient of a random projection of the trunk's
    output F (N, C, H, W) with respect to that patch's input pixels. Exactly 0 for a patch F never sees (a patch
    is embedded on its own, so a dropped token's pixels reach nothing); above 0 for a seen one."""
    x = x.detach().clone().requires_grad_(True)
    out = trunk(x, c_noise, y_onehot, record)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out * weights).sum().backward()
    n, c, h, w = x.shape
    grad = x.grad.abs().reshape(n, c, h // patch, patch, w // patch, patch)
    return grad.sum(dim=(1, 3, 5)).flatten(1)
