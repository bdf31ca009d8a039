"""Token masking for MaskDiT (SPEC section 1.3): which tokens the encoder sees. One implementation, one record."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class MaskRecord:
    """ids_keep (N, L_keep) visible token indices; ids_restore (N, L) inverse permutation; mask (N, L) 1 = removed."""

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor

    @property
    def num_keep(self) -> int:
        return self.ids_keep.shape[1]


def num_kept(num_tokens: int, ratio: float) -> int:
    """floor(L (1 - r)); the 1e-6 guards float error (1 - 0.9 = 0.0999..., so 10 tokens would keep 0, not 1)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    return max(1, math.floor(num_tokens * (1.0 - ratio) + 1e-6))


def record_from_order(order: torch.Tensor, num_keep: int) -> MaskRecord:
    """order (N, L): a permutation per sample whose first num_keep entries are the visible tokens."""
    ids_restore = torch.argsort(order, dim=1)
    mask = torch.ones(order.shape, device=order.device)
    mask[:, :num_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to raster order
    return MaskRecord(ids_keep=order[:, :num_keep], ids_restore=ids_restore, mask=mask)


def random_mask(n: int, num_tokens: int, ratio: float, device=None, generator=None) -> MaskRecord:
    """Keep floor(L (1 - r)) tokens per sample, uniformly and independently (argsort of uniform noise)."""
    noise = torch.rand(n, num_tokens, device=device, generator=generator)
    return record_from_order(torch.argsort(noise, dim=1), num_kept(num_tokens, ratio))


def record_from_mask(mask: torch.Tensor) -> MaskRecord:
    """A caller-supplied binary mask (N, L), 1 = removed. Every sample must remove the same number of tokens."""
    counts = (mask == 0).sum(dim=1)
    if not torch.all(counts == counts[0]):
        raise ValueError(f"every sample must keep the same number of tokens, got counts {counts.tolist()}")
    # Stable sort puts visible tokens (0) first, each group in raster order.
    order = torch.argsort(mask.float(), dim=1, stable=True)
    return record_from_order(order, int(counts[0]))


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (N, L, D), ids (N, K) -> (N, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
