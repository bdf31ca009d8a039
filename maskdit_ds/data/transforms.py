"""Images in and out (docs/method.md §5): RGB conversion, the ADM centre crop, [-1, 1] tensors and flips on the way
in; uint8 pixels and picture grids on the way out."""
import math

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


def halve_large(img: Image.Image, resolution: int) -> Image.Image:
    """ADM's first step: box-downsample by 2 while the short side >= 2 * resolution (so that the later bicubic
    step does not alias on large photos)."""
    while min(*img.size) >= 2 * resolution:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    return img


def adm_center_crop(img: Image.Image, resolution: int) -> np.ndarray:
    """ADM's center_crop_arr: box-downsample by 2 while the short side >= 2 * resolution, bicubic resize
    so that the short side equals resolution (the long side rounded), then a center crop.
    Images smaller than resolution are upscaled by the bicubic step. Returns uint8 (res, res, 3)."""
    img = halve_large(to_rgb(img), resolution)
    scale = resolution / min(*img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)  # (H, W, 3)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return arr[top:top + resolution, left:left + resolution]


def adm_crop_resized(img: Image.Image, resolution: int, out: int) -> np.ndarray:
    """The region adm_center_crop(img, resolution) keeps, resampled once (bicubic) to uint8 (out, out, 3).

    Exactly adm_center_crop when out == resolution. Otherwise one resize of the source region instead of two
    (ADM's resize, then crop, then a resize to `out`): 2x faster at 256 -> 224 px (the alignment teacher's
    input, served per sample by the loader), and within a few grey levels of the two-step result."""
    if out == resolution:
        return adm_center_crop(img, resolution)
    img = halve_large(to_rgb(img), resolution)
    w, h = img.size
    scale = resolution / min(w, h)
    resized_w, resized_h = round(w * scale), round(h * scale)  # ADM's resized size, crop offsets in it
    left, top = (resized_w - resolution) // 2, (resized_h - resolution) // 2
    sx, sy = w / resized_w, h / resized_h  # source pixels per resized pixel, per axis
    box = (left * sx, top * sy, (left + resolution) * sx, (top + resolution) * sy)
    return np.asarray(img.resize((out, out), resample=Image.BICUBIC, box=box))


def to_tensor_pm1(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1] (x / 127.5 - 1, as ADM and the reference do)."""
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
    return x / 127.5 - 1.0


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of a (..., H, W) tensor."""
    return torch.flip(x, dims=(-1,))


def to_uint8(images: torch.Tensor, rounding: str = "floor") -> np.ndarray:
    """[-1, 1] (N, C, H, W) -> uint8 NHWC with 3 channels. floor: the reference's floor(clamp((x+1) 127.5));
    round: 127.5 x + 128 clamped (DiT's convention). Grey images are repeated to RGB for ADM's evaluator."""
    if rounding == "floor":
        pixels = ((images.double() + 1) * 127.5).clamp(0, 255).floor()
    elif rounding == "round":
        pixels = (images.double() * 127.5 + 128).clamp(0, 255).floor()
    else:
        raise ValueError(f"rounding must be floor or round, got {rounding!r}")
    pixels = pixels.to(torch.uint8).permute(0, 2, 3, 1)
    if pixels.shape[-1] == 1:
        pixels = pixels.expand(-1, -1, -1, 3)
    return pixels.contiguous().numpy()


def image_grid(images_uint8: np.ndarray, columns: int = 0) -> np.ndarray:
    """(N, H, W, 3) -> one (rows*H, cols*W, 3) picture."""
    n, h, w, c = images_uint8.shape
    cols = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, img in enumerate(images_uint8):
        r, col = divmod(i, cols)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = img
    return grid


def class_grid(images_uint8: np.ndarray, labels: np.ndarray, rows: int = 10, columns: int = 10,
               min_side: int = 64, gap: int = 2) -> np.ndarray:
    """A picture to read at a glance: one row per class in label order (the first `rows` classes present),
    up to `columns` of its samples, each tile upscaled (nearest) to at least `min_side` px, white gaps between.
    images_uint8 (N, H, W, 3), labels (N,) -> (rows' * (S + gap) + gap, columns * (S + gap) + gap, 3)."""
    n, h, w, c = images_uint8.shape
    scale = max(1, -(-min_side // max(h, w)))  # ceil: 16 px digits -> 4x
    th, tw = h * scale, w * scale
    classes = np.unique(labels)[:rows]
    grid = np.full((len(classes) * (th + gap) + gap, columns * (tw + gap) + gap, c), 255, dtype=np.uint8)
    for r, cls in enumerate(classes):
        for col, i in enumerate(np.flatnonzero(labels == cls)[:columns]):
            top, left = gap + r * (th + gap), gap + col * (tw + gap)
            grid[top : top + th, left : left + tw] = images_uint8[i].repeat(scale, 0).repeat(scale, 1)
    return grid
