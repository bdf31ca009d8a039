"""The 2015 TF Inception-v3 graph used by ADM's evaluator (FID/sFID/IS/P-R), ported to PyTorch.

Module names follow torchvision so that `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid / torch-fidelity)
loads directly. Differences from torchvision's inception_v3, all taken from the TF graph:
1008 classes, BatchNorm eps 1e-3, 3x3 stride-1 average pools that exclude the padding (TF SAME pooling),
a max pool in the pool branch of the last block (Mixed_7c), no auxiliary head.
The TF graph resizes and normalises inside the network, and so does this port.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

INCEPTION_SIZE = 299  # the graph's ResizeBilinear target
NUM_CLASSES = 1008
POOL3_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
SPATIAL_SIZE = 17
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023


@contextlib.contextmanager
def tf32_disabled():
    """TF32 off for cuDNN convs and CUDA matmuls (cuDNN defaults to TF32); the caller's settings come back after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _legacy_source_index(n_in: int, n_out: int, device: torch.device):
    """TF1 ResizeBilinear sampling positions (align_corners=False, half_pixel_centers=False).

    src = d * (n_in / n_out) in float32 with no half-pixel shift; the upper neighbour is clamped to the edge.
    Returns (lower index, upper index, fraction), each (n_out,).
    """
    scale = torch.tensor(n_in / n_out, dtype=torch.float32, device=device)
    src = torch.arange(n_out, dtype=torch.float32, device=device) * scale
    lower = src.floor()
    frac = src - lower
    upper = src.ceil().long().clamp(max=n_in - 1)
    return lower.long().clamp(max=n_in - 1), upper, frac


def resize_bilinear_tf1(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Resize (N, C, H, W) float32 to (N, C, size, size) exactly as TF1's legacy ResizeBilinear does.

    No antialiasing: downscaling is plain 2-tap decimation, which is part of the ADM protocol.
    TF interpolates along W first (top/bottom rows), then along H; we keep that order.
    """
    _, _, h, w = x.shape
    x0, x1, fx = _legacy_source_index(w, size, x.device)
    left, right = x[..., x0], x[..., x1]  # (N, C, H, size)
    x = left + (right - left) * fx
    y0, y1, fy = _legacy_source_index(h, size, x.device)
    top, bottom = x[..., y0, :], x[..., y1, :]  # (N, C, size, size)
    return top + (bottom - top) * fy[:, None]


def spatial_features(mixed_6_conv: torch.Tensor) -> torch.Tensor:
    """ADM's sFID features: (N, 192, 17, 17) post-ReLU Mixed_6d.branch1x1 -> (N, 2023).

    The first 7 channels, flattened channels-last, so element (h, w, c) lands at (h * 17 + w) * 7 + c,
    the order of ADM's TF reshape of the NHWC tensor (its reference mu_s/sigma_s use this order).
    """
    kept = mixed_6_conv[:, :SPATIAL_CHANNELS]  # (N, 7, 17, 17)
    return kept.permute(0, 2, 3, 1).reshape(kept.shape[0], -1)


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (TF eps 1e-3) -> ReLU; TF's `X/conv` node is this ReLU's output."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x):
    # TF SAME average pooling divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b/5c/5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_same(x))], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction (Mixed_6a): stride-2 3x3 | 1x1-3x3-3x3/2 | maxpool/2 (all VALID)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b..6e) with factorised 7x7 convolutions; Mixed_6d.branch1x1 is ADM's mixed_6/conv."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def branches(self, x):
        """The four branch outputs, each (N, 192, 17, 17); the first one is the block's `conv` node."""
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return [self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_same(x))]

    def forward(self, x):
        return torch.cat(self.branches(x), 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b avg-pool branch, Mixed_7c max-pool branch, as in the TF graph)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        s = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_same(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """uint8 images -> (pool3 (N, 2048), sFID spatial (N, 2023), unbiased logits (N, 1008)), all float32.

    Input: uint8 (N, H, W, 3) or (N, 3, H, W) in 0..255 at any resolution. Call `.eval()` first (BatchNorm
    must use the stored statistics); the extractor in `extractor.py` does that and also disables TF32.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)  # 299 -> 149
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)  # -> 147
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)  # -> 147, then maxpool -> 73
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)  # -> 71, then maxpool -> 35
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)  # -> 17
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)  # -> 8
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(POOL3_DIM, NUM_CLASSES)  # softmax/weights (transposed) and softmax/biases

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC/NCHW -> float32 (N, 3, 299, 299) in [-1, 0.9921875], as the graph's Cast/Resize/Sub/Mul."""
        if images.dtype != torch.uint8:
            raise TypeError(f"Inception input must be uint8 images in 0..255, got dtype {images.dtype}")
        if images.ndim != 4 or 3 not in (images.shape[1], images.shape[-1]):
            raise ValueError(f"Inception input must be (N, H, W, 3) or (N, 3, H, W), got {tuple(images.shape)}")
        x = images.float()
        if x.shape[-1] == 3:  # NHWC (the npz layout) -> NCHW
            x = x.permute(0, 3, 1, 2)
        x = resize_bilinear_tf1(x.contiguous(), INCEPTION_SIZE)
        return (x - 128.0) / 128.0

    def forward(self, images: torch.Tensor):
        x = self.preprocess(images)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x = self.Mixed_6c(self.Mixed_6b(x))
        branches = self.Mixed_6d.branches(x)
        spatial = spatial_features(branches[0])  # (N, 2023) from mixed_6/conv
        x = self.Mixed_6e(torch.cat(branches, 1))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        pool3 = x.mean(dim=(2, 3))  # the graph's 8x8 VALID average pool
        logits = pool3 @ self.fc.weight.T  # ADM's IS uses softmax/weights without the bias
        return pool3, spatial, logits
