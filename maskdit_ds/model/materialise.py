"""Build networks without memory or random init on the meta device, then give them storage where they run.

A MaskDiT-XL/2 (730M parameters) initialised on a CPU takes tens of seconds and 3 GB before it is moved to a GPU,
and an export loaded into it overwrites that init anyway. Built under torch.device("meta") a network is shapes
only; `materialise` gives it storage on its device and runs the same initialisation construction would, and
export loading (export.load_pretrained) assigns the file's tensors instead (load_state_dict(assign=True)).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def materialise(net: nn.Module, device) -> nn.Module:
    """Storage on `device` for a meta-built module, initialised in the order construction initialises: each
    child completely (its own reset_parameters: Linear, Conv2d, LayerNorm), in registration order, then the
    parent's own reset, then its initialize_weights (MaskDiT, UViT). On the CPU this draws the same random
    numbers as building there, so a seeded run gets the same weights either way (test_materialise.py). Fixed
    sin-cos tables are recomputed by FixedSinCos._apply."""
    net.to_empty(device=device)
    with torch.no_grad():
        initialise(net)
    return net


def initialise(module: nn.Module) -> None:
    for child in module.children():
        initialise(child)
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
    if hasattr(module, "initialize_weights"):
        module.initialize_weights()


def on_meta(net: nn.Module) -> bool:
    return any(p.is_meta for p in net.parameters())
