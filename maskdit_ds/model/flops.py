"""Analytic matmul FLOPs of MaskDiT, for TFLOP/s and MFU (backward counted as 2x forward)."""
from __future__ import annotations

from .masking import num_kept
from .registry import ModelSize
from .uvit import forward_flops as uvit_forward_flops


def block_flops(tokens: int, dim: int, cond_dim: int, mlp_ratio: float) -> float:
    # qkv 6Td^2 + proj 2Td^2 + mlp 4*ratio*Td^2, attention 4T^2 d, adaLN 12 d cond (once per sample).
    return (8 + 4 * mlp_ratio) * tokens * dim**2 + 4 * tokens**2 * dim + 12 * dim * cond_dim


def forward_flops(size: ModelSize, input_size: int, in_channels: int, mask_ratio: float = 0.0) -> float:
    """Forward FLOPs for one image; the encoder sees floor(L (1 - r)) tokens. U-ViT sizes use their own count."""
    if size.backbone == "uvit":
        return uvit_forward_flops(size, input_size, in_channels, mask_ratio)
    p, d, dd = size.patch_size, size.hidden_size, size.decoder_hidden
    tokens = (input_size // p) ** 2
    kept = num_kept(tokens, mask_ratio) if mask_ratio > 0 else tokens
    flops = 2 * tokens * p * p * in_channels * d  # patch embed (all tokens, before dropping)
    flops += 2 * (256 * d + d * d)  # timestep MLP
    flops += size.depth * block_flops(kept, d, d, size.mlp_ratio)
    flops += 2 * kept * d * dd + 4 * d * d  # encoder -> decoder
    flops += size.decoder_depth * block_flops(tokens, dd, d, size.mlp_ratio)
    flops += 2 * tokens * dd * p * p * in_channels + 4 * d * dd  # final layer
    return float(flops)


def train_flops(size: ModelSize, input_size: int, in_channels: int, mask_ratio: float = 0.0) -> float:
    return 3.0 * forward_flops(size, input_size, in_channels, mask_ratio)


def gemm_shapes(size: ModelSize, input_size: int, micro_batch: int, mask_ratio: float = 0.0,
                max_rows: int = 2048) -> tuple[tuple[int, int, int], ...]:
    """(m, k, n) of the largest matrix products of one training forward: the MLP's first layer in the encoder
    (kept tokens) and in the decoder (all tokens). Rows are capped so that a CPU probe of them stays short."""
    tokens = (input_size // size.patch_size) ** 2
    kept = num_kept(tokens, mask_ratio) if mask_ratio > 0 else tokens
    hidden = int(size.hidden_size * size.mlp_ratio)
    dec_hidden = int(size.decoder_hidden * size.mlp_ratio)
    return ((min(micro_batch * kept, max_rows), size.hidden_size, hidden),
            (min(micro_batch * tokens, max_rows), size.decoder_hidden, dec_hidden))
