"""A tiny random teacher for the alignment tests: a transformers Dinov2 built from a config (no download)."""
from pathlib import Path


def save_tiny_teacher(folder, image_size: int = 8, patch_size: int = 2, channels: int = 1, width: int = 32,
                      registers: int = 0, mean=None, std=None, seed: int = 0) -> Path:
    """save_pretrained layout (config.json, model.safetensors[, preprocessor_config.json]); returns the folder."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig
    from transformers import Dinov2WithRegistersModel

    torch.manual_seed(seed)
    common = dict(image_size=image_size, patch_size=patch_size, num_channels=channels, hidden_size=width,
                  num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * width)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
    else:
        model = Dinov2Model(Dinov2Config(**common))
    folder = Path(folder)
    model.save_pretrained(folder)
    if mean is not None:
        BitImageProcessor(image_mean=mean, image_std=std, do_resize=False, do_center_crop=False).save_pretrained(folder)
    return folder
