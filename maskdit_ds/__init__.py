"""maskdit_ds: MaskDiT (Zheng et al., TMLR 2024) pre-training on DeepSpeed ZeRO-2."""
from .checkpoint import load_pretrained
from .model import MODELS, build_denoiser

__all__ = ["load_pretrained", "build_denoiser", "MODELS"]
