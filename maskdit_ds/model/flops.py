"""Analytic matmul FLOPs per backbone, for TFLOP/s and MFU (backward counted as 2x forward).

`kept` is the number of tokens the encoder sees (MaskRecord.num_keep, Masker.kept); None means all of them. It
depends on the masking strategy (crop keeps floor(sqrt(L (1 - r)))^2 tokens, not floor(L (1 - r))), so callers
take it from the strategy, never from the ratio alone.
"""
from __future__ import annotations

from .registry import ModelSize
from .uvit import EXTRA_TOKENS


def dit_block_flops(tokens: int, dim: int, cond_dim: int, mlp_ratio: float) -> float:
    # qkv 6Td^2 + proj 2Td^2 + mlp 4*ratio*Td^2, attention 4T^2 d, adaLN 12 d cond (once per sample).
    return (8 + 4 * mlp_ratio) * tokens * dim**2 + 4 * tokens**2 * dim + 12 * dim * cond_dim


def uvit_block_flops(tokens: int, dim: int, mlp_ratio: float, skip: bool) -> float:
    # qkv 6Td^2 + proj 2Td^2 + mlp 4*ratio*Td^2 + attention 4T^2 d (+ skip Linear(2d, d): 4Td^2)
    return (8 + 4 * mlp_ratio + (4 if skip else 0)) * tokens * dim**2 + 4 * tokens**2 * dim


def maskdit_forward_flops(size: ModelSize, input_size: int, in_channels: int, kept: int | None) -> float:
    """MaskDiT: the encoder sees `kept` tokens, the decoder all of them."""
    p, d, dd = size.patch_size, size.hidden_size, size.decoder_hidden
    tokens = (input_size // p) ** 2
    kept = tokens if kept is None else kept
    flops = 2 * tokens * p * p * in_channels * d  # patch embed (all tokens, before dropping)
    flops += 2 * (256 * d + d * d)  # timestep MLP
    flops += size.depth * dit_block_flops(kept, d, d, size.mlp_ratio)
    flops += 2 * kept * d * dd + 4 * d * d  # encoder -> decoder
    flops += size.decoder_depth * dit_block_flops(tokens, dd, d, size.mlp_ratio)
    flops += 2 * tokens * dd * p * p * in_channels + 4 * d * dd  # final layer
    return float(flops)


def uvit_forward_flops(size: ModelSize, input_size: int, in_channels: int, kept: int | None) -> float:
    """U-ViT: the trunk sees `kept` patch tokens plus the time and label tokens; the decoder all of them."""
    p, d, dd = size.patch_size, size.hidden_size, size.decoder_hidden
    length = (input_size // p) ** 2
    trunk = (length if kept is None else kept) + EXTRA_TOKENS
    flops = 2 * length * p * p * in_channels * d + 2 * (256 * d + d * d)  # patch embed + time MLP
    half = size.depth // 2
    flops += (half + size.depth % 2) * uvit_block_flops(trunk, d, size.mlp_ratio, False)
    flops += half * uvit_block_flops(trunk, d, size.mlp_ratio, True)
    flops += 2 * trunk * d * dd  # decoder_embed
    flops += size.decoder_depth * uvit_block_flops(length + EXTRA_TOKENS, dd, size.mlp_ratio, False)
    flops += 2 * length * dd * p * p * in_channels  # final layer
    return float(flops)


FORWARD_FLOPS = {"maskdit": maskdit_forward_flops, "uvit": uvit_forward_flops}  # by ModelSize.backbone


def forward_flops(size: ModelSize, input_size: int, in_channels: int, kept: int | None = None) -> float:
    """Forward matmul FLOPs for one image with `kept` encoder tokens (None: unmasked)."""
    return FORWARD_FLOPS[size.backbone](size, input_size, in_channels, kept)


def train_flops(size: ModelSize, input_size: int, in_channels: int, kept: int | None = None) -> float:
    return 3.0 * forward_flops(size, input_size, in_channels, kept)


def gemm_shapes(size: ModelSize, input_size: int, micro_batch: int, kept: int | None = None,
                max_rows: int = 2048) -> tuple[tuple[int, int, int], ...]:
    """(m, k, n) of the largest matrix products of one training forward: the MLP's first layer in the encoder
    (kept tokens) and in the decoder (all tokens). Rows are capped so that a CPU probe of them stays short."""
    tokens = (input_size // size.patch_size) ** 2
    kept = tokens if kept is None else kept
    hidden = int(size.hidden_size * size.mlp_ratio)
    dec_hidden = int(size.decoder_hidden * size.mlp_ratio)
    return ((min(micro_batch * kept, max_rows), size.hidden_size, hidden),
            (min(micro_batch * tokens, max_rows), size.decoder_hidden, dec_hidden))
