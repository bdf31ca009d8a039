"""Transformer building blocks of MaskDiT (docs/method.md §1): DiT blocks with adaLN-Zero, embedders, sin-cos tables."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def sincos_2d_table(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table (1, grid_size**2, dim), built in float64, returned float32.

    Tokens are in raster order. The first half of the channels encodes the column, the second half the row;
    each half is [sin | cos] with frequencies 10000^(-k / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"sin-cos table width must be divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))  # (dim/4,)
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64), indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:  # (L,) -> (L, dim/2)
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode(cols), encode(rows)], axis=1)  # (L, dim)
    return torch.from_numpy(table).float().unsqueeze(0)


class FixedSinCos(nn.Module):
    """A frozen sin-cos table that stays exact float32 when DeepSpeed casts the whole module to fp16/bf16.

    The table is a non-persistent buffer (recomputed, never checkpointed). A dtype cast would round it, so after
    any `_apply` (module.half(), .to(dtype), .cuda(), .to_empty()) we rebuild it in float32 on the new device.
    """

    def __init__(self, dim: int, grid_size: int):
        super().__init__()
        self.dim, self.grid_size = dim, grid_size
        self.register_buffer("table", sincos_2d_table(dim, grid_size), persistent=False)

    def _apply(self, fn, recurse=True):
        # Recomputed after every _apply (a few ms at 512 px): a cast would round it, and to_empty (giving a
        # meta-built network storage, model/materialise.py) would leave it uninitialised.
        super()._apply(fn, recurse)
        self.table = sincos_2d_table(self.dim, self.grid_size).to(self.table.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, L, dim) in the trunk dtype; add in fp32 and round once.
        return (x.float() + self.table).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x: (N, T, D); shift, scale: (N, D)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, L, D) tokens in raster order with a stride-p convolution."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """c_noise (N,) -> (N, D): 256-feature sinusoid (cos first), computed in fp32, then an MLP."""

    def __init__(self, hidden_size: int, freq_size: int = 256):
        super().__init__()
        self.freq_size = freq_size
        self.mlp = nn.Sequential(nn.Linear(freq_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (N, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Float one-hot labels (N, num_classes) -> (N, D). The all-zero row is the unconditional label (embedding 0)."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Linear(num_classes, hidden_size, bias=False)

    def forward(self, y_onehot: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y_onehot)


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv and torch's scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (N, heads, T, d/heads)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block. cond_dim may differ from the width (decoder blocks read the encoder's c)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, cond_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class ModulatedLinear(nn.Module):
    """LayerNorm + adaLN shift/scale from c, then a linear map. Used encoder->decoder and as the final layer."""

    def __init__(self, dim: int, out_dim: int, cond_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x: torch.Tensor, grid: int, patch: int, channels: int) -> torch.Tensor:
    """(N, L, p*p*C) with per-token layout (p_row, p_col, C) -> (N, C, H, W)."""
    n = x.shape[0]
    x = x.reshape(n, grid, grid, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)  # (N, C, g, p, g, p)
    return x.reshape(n, channels, grid * patch, grid * patch)
