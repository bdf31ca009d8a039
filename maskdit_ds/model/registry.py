"""Backbones and their sizes as data (docs/method.md §1, §10): one registration per network family carries
everything the framework needs from it. A new backbone is one register_backbone call, in its own module."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from ..registry import Registry


@dataclass(frozen=True)
class ModelSize:
    """Transformer widths and depths. The decoder is the paper's 8 x 512 x 16-head stack unless overridden."""

    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    decoder_depth: int = 8
    decoder_hidden: int = 512
    decoder_heads: int = 16
    mlp_ratio: float = 4.0
    backbone: str = "maskdit"  # the BACKBONES entry that builds it (register_backbone fills it in)


@dataclass(frozen=True)
class Backbone:
    """One network family.

    network(size, input_size, in_channels, num_classes) -> module with forward(x, c_noise, y_onehot, record, tap)
        -> (N, C, H, W), the contract of MaskDiT.forward
    forward_flops(size, input_size, in_channels, kept) -> matmul FLOPs of one image's forward with `kept` encoder
        tokens (None: all), for TFLOP/s and MFU (model/flops.py)
    compile_units: the block classes torch.compile wraps one by one (engine.compile, regional compilation)
    position_tables: attribute names of its fixed FixedSinCos tables (buffers, not parameters: counted beside them)
    sizes: model.name -> ModelSize, added to MODELS
    """

    network: type
    forward_flops: Callable[..., float]
    compile_units: tuple[type, ...]
    position_tables: tuple[str, ...]
    sizes: dict[str, ModelSize]


BACKBONES: Registry[Backbone] = Registry("backbone")
MODELS: Registry[ModelSize] = Registry("model")  # every registered size by model.name, from all backbones


def register_backbone(name: str, backbone: Backbone) -> Backbone:
    """Register a network family and its sizes (each size's `backbone` set to `name`)."""
    BACKBONES.register(name, backbone)
    for size_name, size in backbone.sizes.items():
        MODELS.register(size_name, dataclasses.replace(size, backbone=name))
    return backbone


def get_size(name: str) -> ModelSize:
    return MODELS[name]
