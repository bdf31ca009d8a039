"""Model sizes as data: the paper's MaskDiT family (docs/method.md §1) plus tiny sizes for tests and examples."""
from __future__ import annotations

from dataclasses import dataclass


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
    backbone: str = "maskdit"  # maskdit (encoder-decoder) | uvit (long skips, MaskDM), see model/__init__.py


_PAPER = {  # name: (encoder depth, width, heads)
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),  # 730,541,200 params at 256 px, 731,819,152 at 512 px
    "H": (32, 1280, 16),
}

MODELS: dict[str, ModelSize] = {
    f"MaskDiT-{name}/{patch}": ModelSize(depth, width, heads, patch)
    for name, (depth, width, heads) in _PAPER.items()
    for patch in (2, 4, 8)
}
# Small sizes for tests, the built-in example and CPU benchmarks (not from the paper).
MODELS["MaskDiT-T/2"] = ModelSize(2, 64, 4, 2, decoder_depth=1, decoder_hidden=32, decoder_heads=4)
MODELS["MaskDiT-Digits/2"] = ModelSize(4, 128, 4, 2, decoder_depth=2, decoder_hidden=64, decoder_heads=4)  # 1.5M

# U-ViT backbone (MaskDM, docs/method.md §10): U-ViT's own sizes (Bao et al. 2023: S 13x512, M 17x768, L 21x1024),
# with the same light MAE-style decoder as MaskDiT, plus tiny sizes for tests and the digits demo.
_UVIT = {"S": (13, 512, 8), "M": (17, 768, 12), "L": (21, 1024, 16)}
MODELS.update({
    f"UViT-{name}/{patch}": ModelSize(depth, width, heads, patch, backbone="uvit")
    for name, (depth, width, heads) in _UVIT.items()
    for patch in (2, 4, 8)
})
MODELS["UViT-T/2"] = ModelSize(3, 64, 4, 2, decoder_depth=1, decoder_hidden=32, decoder_heads=4, backbone="uvit")
MODELS["UViT-Digits/2"] = ModelSize(4, 128, 4, 2, decoder_depth=2, decoder_hidden=64, decoder_heads=4,
                                    backbone="uvit")


def get_size(name: str) -> ModelSize:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name]
