"""Masked EDM loss of MaskDiT (docs/method.md §3): DSM on visible tokens + 0.1 x MAE on masked tokens, per sample;
plus, when the run aligns, lambda x (1 - cos) between projected encoder tokens and teacher features (§11)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.align import alignment_loss


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
    """loss(net, images, labels, masker[, target]) -> (per-sample loss (N,), {"dsm", "mae"[, "align"]: (N,)});
    "align" is there on the steps that align (a target was given).

    net is any callable with the EDMPrecond signature (a DeepSpeed engine wrapping one is fine); with aligned=True
    it is an AlignedDenoiser, which also returns the projected encoder tokens.
    """

    def __init__(self, patch_size: int, num_classes: int, P_mean=-1.2, P_std=1.2, sigma_data=0.5,
                 mae_weight=0.1, label_dropout=0.1, aligned: bool = False, align_weight: float = 0.0):
        self.p, self.num_classes = patch_size, num_classes
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
        self.mae_weight, self.label_dropout = mae_weight, label_dropout
        self.aligned, self.align_weight = aligned, align_weight

    def __call__(self, net, images: torch.Tensor, labels: torch.Tensor, masker=None, target=None):
        """masker(n, device) -> MaskRecord or None (model.masking.Masker); None trains unmasked. It is asked after
        the noise and the label dropout are drawn. target: the teacher's features of the clean images on the token
        grid (N, L, C_t), for an aligned net; None on steps that do not align (the term is then exactly 0)."""
        images = images.float()
        n = images.shape[0]
        sigma = (torch.randn(n, 1, 1, 1, device=images.device) * self.P_std + self.P_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        noisy = images + torch.randn_like(images) * sigma  # noise the full latent before masking
        y = drop_labels(labels, self.num_classes, self.label_dropout)
        record = masker(n, images.device) if masker is not None else None
        out = net(noisy, sigma, y, record=record)
        denoised, projected = out if self.aligned else (out, None)

        # DSM per token: channel mean, then p x p average pool -> (N, L)
        dsm_tok = F.avg_pool2d((weight * (denoised - images) ** 2).mean(dim=1, keepdim=True), self.p).flatten(1)
        if record is None:
            loss = dsm = dsm_tok.mean(dim=1)  # plain EDM: mean over all elements
            mae = torch.zeros_like(dsm)
        else:
            removed = record.mask  # (N, L), 1 = removed
            visible = 1 - removed
            dsm = (dsm_tok * visible).sum(1) / visible.sum(1)
            mae_target = normalize_patches(patchify(noisy, self.p))  # the noisy input, per-patch normalised
            mae_tok = ((patchify(denoised, self.p) - mae_target) ** 2).mean(dim=-1)  # (N, L)
            # clamp: with no masked token the MAE term is 0, not 0/0 = NaN as in the reference code.
            mae = (mae_tok * removed).sum(1) / removed.sum(1).clamp(min=1)
            loss = dsm + self.mae_weight * mae
        parts = {"dsm": dsm.detach(), "mae": mae.detach()}
        if self.aligned:
            align = self.align_term(projected, target, record)
            loss = loss + self.align_weight * align
            if target is not None:  # logged only where it is trained
                parts["align"] = align.detach()
        return loss, parts

    @staticmethod
    def align_term(projected: torch.Tensor, target, record) -> torch.Tensor:
        """(N,) 1 - cos over the visible tokens; without a target, 0 * projected: zero gradients reach the
        projector, so every parameter of the engine still gets a gradient (ZeRO-2 reduces them all)."""
        if target is None:
            return projected.sum(dim=(1, 2)) * 0
        return alignment_loss(projected, target, None if record is None else record.ids_keep)
