"""The frozen teacher of representation alignment (docs/method.md §11): a vision transformer loaded with
transformers (DINOv2 by default, any AutoModel with patch tokens after [CLS] and register tokens works), whose
patch features are pooled or resized to the denoiser's token grid. Frozen and in eval mode; on a GPU in half
precision. Each rank holds a whole copy and encodes its own micro-batch (data parallel only)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DINOv2's input normalisation


class Teacher(nn.Module):
    """images (N, C, H, W) in [-1, 1] (float) or [0, 255] (uint8) -> features (N, grid*grid, C_t) float32 on the
    denoiser's token grid, raster order."""

    def __init__(self, encoder: nn.Module, resolution: int, grid: int, mean, std):
        super().__init__()
        cfg = encoder.config
        self.encoder = encoder.eval().requires_grad_(False)
        self.resolution, self.grid = resolution, grid
        self.patch_grid = resolution // cfg.patch_size
        self.prefix = 1 + getattr(cfg, "num_register_tokens", 0)  # [CLS] and register tokens come first
        self.channels, self.dim = cfg.num_channels, cfg.hidden_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout and the like stay off

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.prepare(images)
        dtype = next(self.encoder.parameters()).dtype
        hidden = self.encoder(pixel_values=x.to(dtype)).last_hidden_state  # (N, prefix + P*P, C_t), layer-normed
        patches = hidden[:, self.prefix:].float()
        return pool_to_grid(patches, self.patch_grid, self.grid)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """-> float32 (N, C_teacher, R, R): resized (bicubic, antialiased, as REPA), channels matched, normalised."""
        x = images.float() / 255 if images.dtype == torch.uint8 else (images.float() + 1) / 2  # [0, 1]
        if x.shape[1] != self.channels:
            x = x.mean(dim=1, keepdim=True).expand(-1, self.channels, -1, -1)  # grey <-> RGB
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", antialias=True,
                              align_corners=False).clamp(0, 1)
        return (x - self.mean) / self.std


def pool_to_grid(patches: torch.Tensor, patch_grid: int, grid: int) -> torch.Tensor:
    """(N, P*P, C) raster patch features -> (N, grid*grid, C): averaged over the patches each token covers when
    P is a multiple of grid, else resized bilinearly."""
    if patch_grid == grid:
        return patches
    n, _, c = patches.shape
    x = patches.transpose(1, 2).reshape(n, c, patch_grid, patch_grid)
    if patch_grid % grid == 0:
        x = F.avg_pool2d(x, patch_grid // grid)
    else:
        x = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False)
    return x.flatten(2).transpose(1, 2)


def load_teacher(spec: str, resolution: int, grid: int, device, dtype: torch.dtype = torch.float32) -> Teacher:
    """A local folder or hub id -> Teacher. Refuses what cannot serve: no patch size, a resolution that is not a
    multiple of it."""
    from transformers import AutoModel
    from transformers.image_processing_utils import ImageProcessingMixin
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the load report lists the classifier head a backbone does not use
    hf_logging.disable_progress_bar()
    try:
        encoder = AutoModel.from_pretrained(spec)
    except (OSError, ValueError) as err:
        raise ConfigError(f"loss.align_teacher: cannot load {spec!r} with transformers: "
                          f"{str(err).splitlines()[0]}") from None
    patch = getattr(encoder.config, "patch_size", None)
    if not isinstance(patch, int) or resolution % patch:
        raise ConfigError(f"loss.align_teacher_resolution: {resolution} must be a multiple of the teacher's patch "
                          f"size ({patch}) for {spec!r}")
    try:
        processor = ImageProcessingMixin.get_image_processor_dict(spec)[0]
        mean, std = processor.get("image_mean", IMAGENET_MEAN), processor.get("image_std", IMAGENET_STD)
    except OSError:  # no preprocessor_config.json: DINOv2's own normalisation
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    if len(mean) != encoder.config.num_channels:
        mean, std = mean[:1] * encoder.config.num_channels, std[:1] * encoder.config.num_channels
    return Teacher(encoder.to(dtype), resolution, grid, mean, std).to(device)

