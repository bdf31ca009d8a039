"""EDM preconditioning (Karras et al. 2022; docs/method.md §2) around the trunk, in fp32: the one place where
precision is decided."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .align import Tap
from .masking import MaskRecord


class EDMPrecond(nn.Module):
    """D(x, sigma, y) = c_skip x + c_out F(c_in x, ln(sigma)/4, y). Inputs and output are float32.

    The trunk runs in whatever dtype its weights have (DeepSpeed may cast it to fp16/bf16); the scalings stay fp32.
    class_labels: int64 (N,) indices, float (N, classes) one-hot rows (a zero row = unconditional), or None.
    """

    def __init__(self, model: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.model = model
        self.sigma_data = sigma_data

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def onehot(self, class_labels, n: int, device) -> torch.Tensor:
        if class_labels is None:
            return torch.zeros(n, self.num_classes, device=device)
        if class_labels.dtype in (torch.int64, torch.int32):
            return F.one_hot(class_labels.long(), self.num_classes).float()
        return class_labels.float()

    def forward(self, x, sigma, class_labels=None, record: MaskRecord | None = None, tap: Tap | None = None
                ) -> torch.Tensor:
        """x (N, C, H, W) at noise level sigma (scalar or (N,)) -> the denoised estimate D, float32 (N, C, H, W).
        record: the training mask the trunk applies (None: every token); tap: see model/align.py."""
        x = x.float()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        sigma = sigma.expand(x.shape[0], 1, 1, 1)  # per-sample sigma, (N, 1, 1, 1)
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        c_noise = sigma.log().flatten() / 4
        trunk_dtype = next(self.model.parameters()).dtype
        y = self.onehot(class_labels, x.shape[0], x.device)
        out = self.model((c_in * x).to(trunk_dtype), c_noise, y, record, tap)
        return c_skip * x + c_out * out.float()

    def guided(self, x, sigma, class_labels, guidance: float = 1.0):
        """Classifier-free guidance D_u + g (D_c - D_u), both branches in one batch. sigma may be per sample."""
        if guidance == 1.0 or class_labels is None:
            return self(x, sigma, class_labels)
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(n)
        y = torch.cat([self.onehot(class_labels, n, x.device), torch.zeros(n, self.num_classes, device=x.device)])
        cond, uncond = self(torch.cat([x, x]), torch.cat([sigma, sigma]), y).chunk(2)
        return uncond + guidance * (cond - uncond)
