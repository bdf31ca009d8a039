"""MaskDiT model family (docs/method.md §1, §10): pure torch, no distributed code.

Backbones register themselves (model/registry.py) when their modules are imported here: maskdit.py, uvit.py.
"""
import contextlib

import torch
import torch.nn as nn

from .export import export, export_state, find_export, load_pretrained, read_export_config
from .flops import forward_flops, gemm_shapes, train_flops
from .maskdit import MaskDiT
from .materialise import materialise, on_meta
from .masking import STRATEGIES, Masker, MaskRecord, Strategy, kept_tokens, make_mask, num_kept
from .precond import EDMPrecond
from .registry import BACKBONES, MODELS, Backbone, ModelSize, get_size, register_backbone
from .uvit import UViT
# What build_denoiser reads from its argument (config.ModelConfig's fields; an export's config.json "model")
DENOISER_FIELDS = ("name", "input_size", "in_channels", "num_classes", "sigma_data")


def build_denoiser(model_cfg, device=None) -> EDMPrecond:
    """model_cfg: a config.ModelConfig, or anything with the DENOISER_FIELDS as attributes.

    device None: built and initialised on the CPU. "meta": shapes only (no memory, no init; for loading weights
    with load_state_dict(assign=True) or counting). Any other device: built on meta and initialised there
    (model/materialise.py; on the CPU the same weights as device None for the same seed)."""
    size = get_size(model_cfg.name)
    with torch.device("meta") if device is not None else contextlib.nullcontext():
        net = BACKBONES[size.backbone].network(size, model_cfg.input_size, model_cfg.in_channels,
                                               model_cfg.num_classes)
        net = EDMPrecond(net, sigma_data=model_cfg.sigma_data)
    if device is not None and torch.device(device).type != "meta":
        materialise(net, device)
    return net


def trunk_blocks(net: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a denoiser (encoder and decoder, any backbone): the units to compile."""
    units = tuple(unit for backbone in BACKBONES.values() for unit in backbone.compile_units)
    return [m for m in net.modules() if isinstance(m, units)]


def position_tables(net: nn.Module) -> list[torch.Tensor]:
    """The fixed sin-cos tables of every backbone network inside `net`: buffers, so not in net.parameters(), but
    part of the model's size as the paper counts it (MaskDiT-XL/2: 730,541,200 at 256 px with them)."""
    return [getattr(m, name).table for m in net.modules() for backbone in BACKBONES.values()
            if isinstance(m, backbone.network) for name in backbone.position_tables]


def token_grid(model_cfg) -> int:
    """Tokens per side: input size / patch size."""
    return model_cfg.input_size // get_size(model_cfg.name).patch_size


__all__ = ["BACKBONES", "DENOISER_FIELDS", "MODELS", "STRATEGIES", "Backbone", "ModelSize", "MaskDiT", "UViT",
           "EDMPrecond", "MaskRecord", "Masker", "Strategy", "build_denoiser", "export", "export_state", "find_export",
           "forward_flops", "gemm_shapes", "get_size", "kept_tokens", "load_pretrained", "make_mask", "materialise",
           "num_kept", "on_meta", "position_tables", "read_export_config", "register_backbone", "token_grid",
           "train_flops", "trunk_blocks"]
