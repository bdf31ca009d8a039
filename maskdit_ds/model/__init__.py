"""MaskDiT model family (docs/method.md §1, §10): pure torch, no distributed code."""
import torch.nn as nn

from .export import export, export_state, find_export, load_pretrained, read_export_config
from .flops import forward_flops, gemm_shapes, train_flops
from .layers import DiTBlock
from .maskdit import MaskDiT
from .masking import STRATEGIES, Masker, MaskRecord, kept_tokens, make_mask, num_kept
from .precond import EDMPrecond
from .registry import MODELS, ModelSize, get_size
from .uvit import UViT, UViTBlock

BACKBONES = {"maskdit": MaskDiT, "uvit": UViT}  # ModelSize.backbone -> network class
# What build_denoiser reads from its argument (config.ModelConfig's fields; an export's config.json "model")
DENOISER_FIELDS = ("name", "input_size", "in_channels", "num_classes", "sigma_data")


def trunk_blocks(net: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a denoiser (encoder and decoder, both backbones): the units to compile."""
    return [m for m in net.modules() if isinstance(m, (DiTBlock, UViTBlock))]


def build_denoiser(model_cfg) -> EDMPrecond:
    """model_cfg: a config.ModelConfig, or anything with the DENOISER_FIELDS as attributes."""
    size = get_size(model_cfg.name)
    if size.backbone not in BACKBONES:
        raise ValueError(f"model {model_cfg.name}: unknown backbone {size.backbone!r}")
    net = BACKBONES[size.backbone](size, model_cfg.input_size, model_cfg.in_channels, model_cfg.num_classes)
    return EDMPrecond(net, sigma_data=model_cfg.sigma_data)


def token_grid(model_cfg) -> int:
    """Tokens per side: input size / patch size."""
    return model_cfg.input_size // get_size(model_cfg.name).patch_size


__all__ = ["BACKBONES", "DENOISER_FIELDS", "MODELS", "STRATEGIES", "ModelSize", "MaskDiT", "UViT", "EDMPrecond", "MaskRecord", "Masker",
           "build_denoiser", "export", "export_state", "find_export", "forward_flops", "gemm_shapes", "get_size",
           "kept_tokens", "load_pretrained", "make_mask", "num_kept", "read_export_config", "token_grid",
           "train_flops", "trunk_blocks"]
