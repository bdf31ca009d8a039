"""Checkpoints into our export folders (config.json + model.safetensors) and out to the Hub: our ZeRO tags, the
MaskDiT paper's released checkpoints, DiT's weights as an encoder initialisation (docs/checkpoints.md)."""
from .common import ConversionError, safe_torch_load
from .dit import convert_dit
from .hub import make_hub_folder, push_to_hub
from .ours import convert_zero
from .paper import convert_paper

__all__ = ["ConversionError", "convert_dit", "convert_paper", "convert_zero", "make_hub_folder", "push_to_hub",
           "safe_torch_load"]
