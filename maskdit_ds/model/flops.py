"""Analytic matmul FLOPs, for TFLOP/s and MFU (backward counted as 2x forward); each backbone registers its own
forward count (model/registry.py).

`kept` is the number of tokens the encoder sees (MaskRecord.num_keep, Masker.kept); None means all of them. It
depends on the masking strategy (crop keeps floor(sqrt(L (1 - r)))^2 tokens, not floor(L (1 - r))), so callers
take it from the strategy, never from the ratio alone.
"""
from __future__ import annotations

from .registry import BACKBONES, ModelSize


def forward_flops(size: ModelSize, input_size: int, in_channels: int, kept: int | None = None) -> float:
    """Forward matmul FLOPs for one image with `kept` encoder tokens (None: unmasked)."""
    return BACKBONES[size.backbone].forward_flops(size, input_size, in_channels, kept)


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
