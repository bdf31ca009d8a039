"""MaskDiT model family (docs/method.md §1, §10): pure torch, no distributed code."""
import contextlib

import torch
import torch.nn as nn

from .export import export, export_state, find_export, load_pretrained, read_export_config
from .flops import forward_flops, gemm_shapes, train_flops
from .layers import DiTBlock
from .maskdit import MaskDiT
from .materialise import materialise, on_meta
from .masking import STRATEGIES, Masker, MaskRecord, kept_tokens, make_mask, num_kept
from .precond import EDMPrecond
from .registry import MODELS, ModelSize, get_size
from .uvit import UViT, UViTBlock

BACKBONES = {"maskdit": MaskDiT, "uvit": UViT}  # ModelSize.backbone -> network class


def trunk_blocks(net: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a denoiser (encoder and decoder, both backbones): the units to compile."""
    return [m for m in net.modules() if isinstance(m, (DiTBlock, UViTBlock))]


def build_denoiser(model_cfg, device=None) -> EDMPrecond:
    """model_cfg: a config.ModelConfig (or anything with name, input_size, in_channels, num_classes, sigma_data).

    device None: built and initialised on the CPU. "meta": shapes only (no memory, no init; for loading weights
    with load_state_dict(assign=True) or counting). Any other device: built on meta and initialised there
    (model/materialise.py; on the CPU the same weights as device None for the same seed)."""
    size = get_size(model_cfg.name)
    if size.backbone not in BACKBONES:
        raise ValueError(f"model {model_cfg.name}: unknown backbone {size.backbone!r}")
    with torch.device("meta") if device is not None else contextlib.nullcontext():
        net = BACKBONES[size.backbone](size, model_cfg.input_size, model_cfg.in_channels, model_cfg.num_classes)
        net = EDMPrecond(net, sigma_data=model_cfg.sigma_data)
    if device is not None and torch.device(device).type != "meta":
        materialise(net, device)
    return net


def token_grid(model_cfg) -> int:
    """Tokens per side: input size / patch size."""
    return model_cfg.input_size // get_size(model_cfg.name).patch_size


__all__ = ["BACKBONES", "MODELS", "STRATEGIES", "ModelSize", "MaskDiT", "UViT", "EDMPrecond", "MaskRecord", "Masker",
           "build_denoiser", "export", "export_state", "find_export", "forward_flops", "gemm_shapes", "get_size",
           "kept_tokens", "load_pretrained", "make_mask", "materialise", "num_kept", "on_meta", "read_export_config",
           "token_grid", "train_flops", "trunk_blocks"]
