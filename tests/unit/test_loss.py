"""Masked EDM loss (docs/method.md §3): DSM on visible tokens, MAE on masked tokens, plain EDM at ratio 0."""
import torch

from maskdit_ds.diffusion.loss import MaskedEDMLoss, drop_labels, normalize_patches, patchify
from maskdit_ds.model.masking import record_from_mask


class FixedNet:
    """Stands in for EDMPrecond: returns a given D, and records what it was called with."""

    def __init__(self, denoised):
        self.denoised = denoised

    def __call__(self, x, sigma, y, record=None):
        self.x, self.sigma, self.y, self.record = x, sigma, y, record
        return self.denoised


def fixed_masker(mask):
    """A masker that always answers this (N, L) pattern (1 = removed)."""
    return lambda n, device=None: record_from_mask(mask)


def test_ratio_zero_is_plain_edm_loss():
    torch.manual_seed(0)
    images, denoised = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    net = FixedNet(denoised)
    torch.manual_seed(5)
    loss, parts = MaskedEDMLoss(2, 10, label_dropout=0.0)(net, images, torch.arange(4))
    sigma = net.sigma
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    expected = (weight * (denoised - images) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss, expected, atol=1e-6) and torch.all(parts["mae"] == 0) and net.record is None
    # The network got y + sigma * eps with ln(sigma) ~ N(-1.2, 1.2^2), noise on every element: replay the draws.
    torch.manual_seed(5)
    replay_sigma = (torch.randn(4, 1, 1, 1) * 1.2 - 1.2).exp()
    assert torch.equal(sigma, replay_sigma) and torch.equal(net.x, images + torch.randn_like(images) * replay_sigma)


def test_dsm_ignores_masked_tokens_and_mae_ignores_visible_tokens():
    torch.manual_seed(0)
    images = torch.randn(2, 4, 4, 4)  # patch 2 -> 4 tokens
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 0]])
    base = torch.randn(2, 4, 4, 4)
    loss_fn = MaskedEDMLoss(2, 10, label_dropout=0.0)

    def run(denoised):
        torch.manual_seed(1)
        return loss_fn(FixedNet(denoised), images, torch.arange(2), fixed_masker(mask))[1]

    parts = run(base)
    bumped = base.clone()
    bumped[0, :, 0:2, 0:2] += 5.0  # token 0 of sample 0 is masked
    parts_masked = run(bumped)
    assert torch.allclose(parts_masked["dsm"], parts["dsm"]) and not torch.allclose(parts_masked["mae"], parts["mae"])
    bumped = base.clone()
    bumped[0, :, 0:2, 2:4] += 5.0  # token 1 of sample 0 is visible
    parts_visible = run(bumped)
    assert torch.allclose(parts_visible["mae"], parts["mae"]) and not torch.allclose(parts_visible["dsm"], parts["dsm"])


def test_mae_target_is_normalised_noisy_input_and_total_weight():
    torch.manual_seed(0)
    images, denoised = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    mask = torch.tensor([[1.0, 1, 0, 0]])
    net = FixedNet(denoised)
    loss, parts = MaskedEDMLoss(2, 10, label_dropout=0.0)(net, images, torch.tensor([3]), fixed_masker(mask))
    target = normalize_patches(patchify(net.x, 2))
    mae = ((patchify(denoised, 2) - target) ** 2).mean(-1)[0, :2].mean()
    assert torch.allclose(parts["mae"][0], mae, atol=1e-6)
    assert torch.allclose(loss, parts["dsm"] + 0.1 * parts["mae"])
    p = patchify(net.x, 2)[0, 0]
    assert torch.allclose(target[0, 0], (p - p.mean()) / (p.var(unbiased=True) + 1e-6).sqrt())


def test_no_masked_token_gives_finite_loss():
    images = torch.randn(2, 4, 4, 4)
    net = FixedNet(torch.randn(2, 4, 4, 4))
    loss, parts = MaskedEDMLoss(2, 10)(net, images, torch.arange(2), fixed_masker(torch.zeros(2, 4)))
    assert torch.isfinite(loss).all() and torch.all(parts["mae"] == 0)


def test_patchify_layout_is_row_col_channel():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    p = patchify(x, 2)  # (1, 4, 8)
    # token 1 = top-right patch; its values in (p_row, p_col, channel) order
    expected = [x[0, c, r, 2 + q].item() for r in range(2) for q in range(2) for c in range(2)]
    assert p[0, 1].tolist() == expected


def test_label_dropout_rate():
    torch.manual_seed(0)
    y = drop_labels(torch.zeros(20000, dtype=torch.long), 10, 0.1)
    dropped = (y.sum(1) == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.01 and set(y.sum(1).tolist()) <= {0.0, 1.0}
