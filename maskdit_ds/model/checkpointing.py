"""Activation checkpointing per transformer block (engine.activation_checkpointing): a block keeps only its
inputs in the forward and recomputes its inside in the backward, trading about one more forward of the trunk
for most of its activation memory. Pure torch (torch.utils.checkpoint, non-reentrant, so it composes with
torch.compile and with inputs that need no gradient); the modules and their state-dict keys stay as they are."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .layers import DiTBlock
from .uvit import UViTBlock


class CheckpointedDiTBlock(DiTBlock):
    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # sampling and the EMA: nothing to save
            return super().forward(x, c)
        return checkpoint(super().forward, x, c, use_reentrant=False)


class CheckpointedUViTBlock(UViTBlock):
    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x, skip)
        return checkpoint(super().forward, x, skip, use_reentrant=False)


CHECKPOINTED = {DiTBlock: CheckpointedDiTBlock, UViTBlock: CheckpointedUViTBlock}


def checkpoint_blocks(net: nn.Module) -> int:
    """Make every encoder and decoder block of `net` checkpoint itself (in place: the block's class becomes its
    checkpointing subclass, so copies and compiled blocks keep it). Returns the number of blocks."""
    count = 0
    for module in net.modules():
        if type(module) in CHECKPOINTED:
            module.__class__ = CHECKPOINTED[type(module)]
            count += 1
    return count
