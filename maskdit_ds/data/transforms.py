"""Image preprocessing of MaskDiT (SPEC 5): RGB conversion, ADM center crop, [-1, 1] tensors, flips."""

import numpy as np
import torch
from PIL import Image


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Grayscale, palette, CMYK and alpha modes go through PIL's own conversion
    (alpha is dropped, as torchvision's loader does); 16-bit and float grayscale are rescaled to
    8 bits first because PIL's convert("RGB") would clip them to white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(a * (255.0 / peak), 0, 255).round().astype(np.uint8), mode="L")
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(a * 255.0 if a.max(initial=0) <= 1.0 else a, 0, 255).round().astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL warns when a palette image with transparency goes straight to RGB
    return img.convert("RGB")


def adm_center_crop(img: Image.Image, resolution: int) -> np.ndarray:
    """ADM's center_crop_arr: box-downsample by 2 while the short side >= 2 * resolution, bicubic resize
    so that the short side equals resolution (the long side rounded), then a center crop.
    Images smaller than resolution are upscaled by the bicubic step. Returns uint8 (res, res, 3)."""
    img = to_rgb(img)
    # Halving with a box filter first keeps the later bicubic step from aliasing on large photos.
    while min(*img.size) >= 2 * resolution:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = resolution / min(*img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)  # (H, W, 3)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return arr[top:top + resolution, left:left + resolution]


def to_tensor_pm1(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1] (x / 127.5 - 1, as ADM and the reference do)."""
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
    return x / 127.5 - 1.0


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of a (..., H, W) tensor."""
    return torch.flip(x, dims=(-1,))
