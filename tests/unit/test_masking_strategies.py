"""Invariants of the MaskDM mask strategies in maskdit_ds.model.masking: counts, coverage, shape, determinism."""
import math

import pytest
import torch

from maskdit_ds.model.masking import block_mask, crop_mask, make_mask, num_kept, random_mask

RATIOS = (0.5, 0.75, 0.9)
GRIDS = (4, 8, 16, 7)  # 7: blocks of 2, 3 or 4 do not tile it (edge blocks are smaller)


def expected_kept(strategy: str, grid: int, ratio: float) -> int:
    """What make_mask documents: floor(L (1 - r)) for random/block, floor(sqrt(L (1 - r)))^2 for crop."""
    if strategy == "crop":
        side = max(1, math.floor(math.sqrt(grid * grid * (1 - ratio)) + 1e-6))
        return side * side
    return num_kept(grid * grid, ratio)


def visible_grid(record, grid: int) -> torch.Tensor:
    """(N, g, g) bool: True where the token is visible."""
    return (record.mask == 0).reshape(-1, grid, grid)


# ---------------------------------------------------------------- counts and record consistency


@pytest.mark.parametrize("strategy", ["random", "block", "crop"])
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_exact_kept_counts_and_consistent_record(strategy, grid, ratio):
    n, length = 32, grid * grid
    record = make_mask(strategy, n, grid, ratio, block=2, generator=torch.Generator().manual_seed(1))
    kept = expected_kept(strategy, grid, ratio)
    assert record.mask.shape == (n, length) and record.ids_restore.shape == (n, length)
    assert record.ids_keep.shape == (n, kept)
    # every sample keeps the same number of tokens (the encoder batch stays rectangular)
    assert torch.equal((record.mask == 0).sum(1), torch.full((n,), kept))
    assert set(record.mask.unique().tolist()) <= {0.0, 1.0}
    # ids_keep names exactly the visible tokens, without repeats
    visible_from_ids = torch.zeros(n, length).scatter_(1, record.ids_keep, 1.0)
    assert torch.equal(visible_from_ids, 1 - record.mask)
    # ids_restore undoes the keep-first order: gathering [kept | removed] with it gives raster order back
    order = torch.argsort(record.ids_restore, dim=1)
    assert torch.equal(order[:, :kept].sort(1).values, record.ids_keep.sort(1).values)
    assert torch.equal(torch.gather(order, 1, record.ids_restore), torch.arange(length).expand(n, -1))


@pytest.mark.parametrize("block", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("grid", [8, 16, 7])
@pytest.mark.parametrize("ratio", RATIOS)
def test_block_counts_for_every_block_size(block, grid, ratio):
    record = block_mask(16, grid, ratio, block, generator=torch.Generator().manual_seed(2))
    assert torch.equal((record.mask == 0).sum(1), torch.full((16,), num_kept(grid * grid, ratio)))


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="mask strategy"):
        make_mask("stripes", 2, 8, 0.5)
    for strategy in ("random", "block", "crop"):
        for ratio in (1.0, -0.1):
            with pytest.raises(ValueError, match="mask ratio"):
                make_mask(strategy, 2, 8, ratio)


# ---------------------------------------------------------------- structure


def block_ids(grid: int, block: int) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return ((rows // block) * -(-grid // block) + cols // block).flatten()


@pytest.mark.parametrize("grid,block", [(8, 2), (16, 4), (16, 2), (7, 3), (8, 8), (4, 1)])
@pytest.mark.parametrize("ratio", RATIOS)
def test_block_masks_are_whole_blocks_but_one(grid, block, ratio):
    """Each block is fully visible, fully masked, or (for at most one block per sample) partly visible."""
    record = block_mask(64, grid, ratio, block, generator=torch.Generator().manual_seed(3))
    ids = block_ids(grid, block)
    visible = (record.mask == 0).float()  # (N, L)
    per_block = torch.zeros(64, int(ids.max()) + 1).index_add_(1, ids, visible)  # visible tokens per block
    size = torch.bincount(ids).float()  # tokens per block (edge blocks can be smaller)
    partial = (per_block > 0) & (per_block < size)
    assert int(partial.sum(1).max()) <= 1
    # with L(1-r) a multiple of the block area and a tiling grid, no block is partial at all
    if grid % block == 0 and num_kept(grid * grid, ratio) % (block * block) == 0:
        assert int(partial.sum()) == 0


def test_block_size_one_is_a_random_patch_mask():
    """b = 1: every token is its own block, so the set of visible tokens is a uniform random subset."""
    record = block_mask(4000, 4, 0.75, 1, generator=torch.Generator().manual_seed(4))
    freq = record.mask.mean(0)
    assert torch.allclose(freq, torch.full_like(freq, 0.75), atol=0.03)


@pytest.mark.parametrize("grid", [8, 16, 7])
@pytest.mark.parametrize("ratio", RATIOS)
def test_crop_visible_set_is_one_square(grid, ratio):
    record = crop_mask(64, grid, ratio, generator=torch.Generator().manual_seed(5))
    side = math.isqrt(expected_kept("crop", grid, ratio))
    for vis in visible_grid(record, grid):
        rows, cols = vis.any(1).nonzero().flatten(), vis.any(0).nonzero().flatten()
        # the bounding box of the visible tokens is side x side and completely filled
        assert rows.numel() == side and cols.numel() == side
        assert int(rows[-1] - rows[0]) == side - 1 and int(cols[-1] - cols[0]) == side - 1
        assert bool(vis[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all())


def test_crop_window_visits_every_position():
    grid, ratio = 8, 0.75  # side 4: 5 x 5 possible top-left corners
    record = crop_mask(2000, grid, ratio, generator=torch.Generator().manual_seed(6))
    vis = visible_grid(record, grid)
    corners = {(int(v.any(1).nonzero()[0]), int(v.any(0).nonzero()[0])) for v in vis}
    assert corners == {(r, c) for r in range(5) for c in range(5)}


# ---------------------------------------------------------------- coverage statistics


@pytest.mark.parametrize("strategy,grid,block", [("random", 8, 1), ("random", 16, 1), ("block", 8, 2),
                                                 ("block", 16, 4), ("block", 16, 2)])
@pytest.mark.parametrize("ratio", RATIOS)
def test_every_token_is_masked_at_the_ratio(strategy, grid, block, ratio):
    """Over many draws each token is removed with frequency ~ L_removed / L (tiling grids: no position bias)."""
    draws = 6000
    record = make_mask(strategy, draws, grid, ratio, block=block, generator=torch.Generator().manual_seed(7))
    length = grid * grid
    target = 1 - num_kept(length, ratio) / length
    freq = record.mask.mean(0)  # (L,)
    # binomial standard error sqrt(p (1 - p) / draws) <= 0.0065; block masks correlate tokens of a block but each
    # token's marginal is still a plain Bernoulli, so 5 standard errors is a safe band
    assert float((freq - target).abs().max()) < 5 * math.sqrt(target * (1 - target) / draws) + 1e-3
    assert abs(float(freq.mean()) - target) < 1e-6  # exact: every sample removes the same count


def crop_axis_visible(grid: int, side: int) -> torch.Tensor:
    """(grid,) probability that row i lies in a side-long window whose start is uniform over grid - side + 1."""
    starts = torch.arange(grid - side + 1)
    rows = torch.arange(grid).view(-1, 1)
    return ((rows >= starts) & (rows < starts + side)).float().mean(1)


@pytest.mark.parametrize("grid", [8, 16])
@pytest.mark.parametrize("ratio", RATIOS)
def test_crop_coverage_matches_the_window_distribution(grid, ratio):
    """A crop is not uniform over positions: centre tokens are visible more often. Each token's masking
    frequency must match the exact law of a uniformly placed side x side window, 1 - p(row) p(col)."""
    draws = 6000
    record = crop_mask(draws, grid, ratio, generator=torch.Generator().manual_seed(10))
    axis = crop_axis_visible(grid, math.isqrt(expected_kept("crop", grid, ratio)))
    target = 1 - torch.outer(axis, axis).flatten()  # (L,) masking probability per token
    freq = record.mask.mean(0)
    band = 5 * torch.sqrt(target * (1 - target) / draws) + 1e-3
    assert bool(((freq - target).abs() <= band).all()), float((freq - target).abs().max())
    # a window longer than half the grid always covers the centre: at r = 0.5 the centre tokens are never masked
    # (a property of crops, documented in docs/maskdm.md); from r = 0.75 every token is masked sometimes
    assert bool((target > 0).all()) == (ratio >= 0.75)


def test_random_masks_are_independent_across_samples():
    record = random_mask(3000, 8, 0.5, generator=torch.Generator().manual_seed(8))
    a, b = record.mask[0::2], record.mask[1::2]
    # P(both removed) = P(removed)^2 = 0.25 for independent samples
    assert abs(float((a * b).mean()) - 0.25) < 0.01


def test_block_masks_remove_blocks_together():
    """Neighbours in the same block share their fate far more often than under random patches."""
    grid, ratio = 8, 0.75
    blk = block_mask(3000, grid, ratio, 2, generator=torch.Generator().manual_seed(9)).mask.reshape(-1, grid, grid)
    rnd = random_mask(3000, grid, ratio, generator=torch.Generator().manual_seed(9)).mask.reshape(-1, grid, grid)
    same_block = (blk[:, 0, 0] == blk[:, 0, 1]).float().mean()  # tokens (0,0) and (0,1) share a 2x2 block
    same_random = (rnd[:, 0, 0] == rnd[:, 0, 1]).float().mean()
    assert float(same_block) > 0.99 and float(same_random) < 0.7


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("strategy", ["random", "block", "crop"])
def test_deterministic_with_a_generator(strategy):
    def draw(seed):
        return make_mask(strategy, 8, 8, 0.75, block=2, generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(11), draw(11), draw(12)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_keep, b.ids_keep)
    assert torch.equal(a.ids_restore, b.ids_restore)
    assert not torch.equal(a.mask, c.mask)


@pytest.mark.parametrize("strategy", ["random", "block", "crop"])
def test_generator_does_not_touch_the_global_rng(strategy):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    make_mask(strategy, 4, 8, 0.5, block=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.rand(3), expected)
