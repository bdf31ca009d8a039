"""Masked EDM loss of MaskDiT (docs/method.md §3): DSM on visible tokens + 0.1 x MAE on masked tokens, per sample."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), per-token layout (p_row, p_col, C), tokens in raster order."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)  # (N, h, w, p, p, C)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch standardisation of the MAE target: unbiased variance over the p*p*C values."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, unbiased=True, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def drop_labels(labels: torch.Tensor, num_classes: int, p: float) -> torch.Tensor:
    """int labels (N,) -> float one-hot (N, classes) with each row zeroed with probability p (CFG training)."""
    onehot = F.one_hot(labels.long(), num_classes).float()
    keep = (torch.rand(labels.shape[0], 1, device=labels.device) >= p).float()
    return onehot * keep


class MaskedEDMLoss:
    """loss(net, images, labels, masker) -> (per-sample loss (N,), {"dsm": (N,), "mae": (N,)}).

    net is any callable with the EDMPrecond signature (a DeepSpeed engine wrapping one is fine).
    """

    def __init__(self, patch_size: int, num_classes: int, P_mean=-1.2, P_std=1.2, sigma_data=0.5,
                 mae_weight=0.1, label_dropout=0.1):
        self.p, self.num_classes = patch_size, num_classes
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
        self.mae_weight, self.label_dropout = mae_weight, label_dropout

    def __call__(self, net, images: torch.Tensor, labels: torch.Tensor, masker=None):
        """masker(n, device) -> MaskRecord or None (model.masking.Masker); None trains unmasked. It is asked after
        the noise and the label dropout are drawn."""
        images = images.float()
        n = images.shape[0]
        sigma = (torch.randn(n, 1, 1, 1, device=images.device) * self.P_std + self.P_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        noisy = images + torch.randn_like(images) * sigma  # noise the full latent before masking
        y = drop_labels(labels, self.num_classes, self.label_dropout)
        record = masker(n, images.device) if masker is not None else None
        denoised = net(noisy, sigma, y, record=record)

        # DSM per token: channel mean, then p x p average pool -> (N, L)
        dsm_tok = F.avg_pool2d((weight * (denoised - images) ** 2).mean(dim=1, keepdim=True), self.p).flatten(1)
        if record is None:
            dsm = dsm_tok.mean(dim=1)  # plain EDM: mean over all elements
            return dsm, {"dsm": dsm.detach(), "mae": torch.zeros_like(dsm)}
        removed = record.mask  # (N, L), 1 = removed
        visible = 1 - removed
        dsm = (dsm_tok * visible).sum(1) / visible.sum(1)
        target = normalize_patches(patchify(noisy, self.p))  # MAE target: the noisy input, per-patch normalised
        mae_tok = ((patchify(denoised, self.p) - target) ** 2).mean(dim=-1)  # (N, L)
        # clamp: with no masked token the MAE term is 0, not 0/0 = NaN as in the reference code.
        mae = (mae_tok * removed).sum(1) / removed.sum(1).clamp(min=1)
        loss = dsm + self.mae_weight * mae
        return loss, {"dsm": dsm.detach(), "mae": mae.detach()}
