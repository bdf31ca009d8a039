"""Token masking (docs/method.md §1 and §10): which tokens the encoder sees, by strategy, as one record type.

The one route: the training step builds a Masker for the step's ratio; the loss asks it for a MaskRecord after
drawing its noise; the model only consumes the record (None: unmasked). A new strategy is one registration in
STRATEGIES: a function with the signature of random_mask plus its kept-token count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..registry import Registry


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


def random_mask(n: int, grid: int, ratio: float, block: int = 0, device=None, generator=None) -> MaskRecord:
    """MaskDiT: keep floor(L (1 - r)) tokens per sample, uniformly and independently (argsort of uniform noise)."""
    noise = torch.rand(n, grid * grid, device=device, generator=generator)
    return record_from_order(torch.argsort(noise, dim=1), num_kept(grid * grid, ratio))


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


def block_mask(n: int, grid: int, ratio: float, block: int, device=None, generator=None) -> MaskRecord:
    """MaskDM's structured masks: b x b token blocks become visible in a random order until floor(L (1 - r))
    tokens are visible; the last block may be partly visible so every sample keeps exactly that many."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    per_row = -(-grid // block)  # ceil: edge blocks may be smaller
    block_id = ((rows // block) * per_row + cols // block).flatten().to(device)  # (L,)
    block_rank = torch.argsort(torch.rand(n, per_row**2, device=device, generator=generator), dim=1).argsort(dim=1)
    # Integer rank orders blocks; the jitter in [0, 1) shuffles tokens inside a block without crossing blocks.
    key = block_rank[:, block_id] * 2.0 + torch.rand(n, grid * grid, device=device, generator=generator)
    return record_from_order(torch.argsort(key, dim=1), num_kept(grid * grid, ratio))


def crop_side(grid: int, ratio: float) -> int:
    """Side of crop_mask's visible window: floor(sqrt(L (1 - r))) tokens (at least 1)."""
    num_kept(grid * grid, ratio)  # raises on a ratio outside [0, 1)
    return max(1, math.floor(math.sqrt(grid * grid * (1.0 - ratio)) + 1e-6))


def crop_mask(n: int, grid: int, ratio: float, block: int = 0, device=None, generator=None) -> MaskRecord:
    """One square window stays visible: side floor(sqrt(L (1 - r))) tokens, at a uniform random position."""
    side = crop_side(grid, ratio)
    top = torch.randint(0, grid - side + 1, (n, 1, 1), device=device, generator=generator)
    left = torch.randint(0, grid - side + 1, (n, 1, 1), device=device, generator=generator)
    idx = torch.arange(grid, device=device)
    inside = ((idx.view(1, -1, 1) >= top) & (idx.view(1, -1, 1) < top + side)
              & (idx.view(1, 1, -1) >= left) & (idx.view(1, 1, -1) < left + side))  # (N, g, g)
    return record_from_mask((~inside).flatten(1).float())


@dataclass(frozen=True)
class Strategy:
    """make(n, grid, ratio, block, device, generator) -> MaskRecord; kept(grid, ratio) -> tokens it keeps."""

    make: Callable[..., MaskRecord]
    kept: Callable[[int, float], int]


STRATEGIES: Registry[Strategy] = Registry("mask strategy")  # mask.strategy
STRATEGIES.register("random", Strategy(random_mask, lambda grid, ratio: num_kept(grid * grid, ratio)))
STRATEGIES.register("block", Strategy(block_mask, lambda grid, ratio: num_kept(grid * grid, ratio)))
STRATEGIES.register("crop", Strategy(crop_mask, lambda grid, ratio: crop_side(grid, ratio) ** 2))


def make_mask(strategy: str, n: int, grid: int, ratio: float, block: int = 4, device=None,
              generator=None) -> MaskRecord | None:
    """The record for n samples on a grid x grid token grid; None at ratio 0 (nothing is removed)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    if ratio == 0:
        return None
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown mask strategy {strategy!r}; use one of {STRATEGIES.known()}")
    return STRATEGIES[strategy].make(n, grid, ratio, block, device=device, generator=generator)


def kept_tokens(strategy: str, grid: int, ratio: float) -> int:
    """Tokens the encoder sees per sample (all at ratio 0): what FLOP counts use."""
    return grid * grid if ratio <= 0 else STRATEGIES[strategy].kept(grid, ratio)


@dataclass(frozen=True)
class Masker:
    """One training step's masking: strategy, token grid, ratio (and block side). Called by the loss once it has
    drawn its noise, so the random stream is noise, then labels, then the mask."""

    strategy: str = "random"
    grid: int = 1
    ratio: float = 0.0
    block: int = 4

    def __call__(self, n: int, device=None) -> MaskRecord | None:
        return make_mask(self.strategy, n, self.grid, self.ratio, self.block, device=device)

    @property
    def kept(self) -> int:
        return kept_tokens(self.strategy, self.grid, self.ratio)
