"""Latents with their source images beside them, for representation alignment (docs/method.md §11): the teacher
sees the clean image each cached latent was encoded from.

A latent cache records, per row, the source index and whether the row is the flipped copy; the image is reloaded
from the source, the region of the same ADM crop at the cache's resolution is resampled once to the teacher's
resolution in the loader worker and flipped like the row (so uint8 at teacher size is what travels to the device).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from .latent_cache import LatentCache
from .sources import open_source
from .transforms import adm_crop_resized


class LatentsWithImages(torch.utils.data.Dataset):
    """item i -> {"x": moments (2C, h, w), "y": label, "image": uint8 (3, R, R)}: the cache's row i and its source
    image at the teacher's resolution R."""

    def __init__(self, cache: LatentCache, resolution: int, image_source: str = ""):
        self.cache, self.resolution = cache, resolution
        self.crop = cache.meta["resolution"]
        self.source = open_recorded_source(cache, image_source)
        rows = cache.data.with_format("numpy", columns=["index", "flip"])[:]
        self.index, self.flip = np.asarray(rows["index"], np.int64), np.asarray(rows["flip"], bool)

    def __len__(self) -> int:
        return len(self.cache)

    def image(self, i: int) -> torch.Tensor:
        """uint8 (3, R, R): row i's source image, the ADM crop's region at the cache resolution resampled to R,
        flipped like the row."""
        arr = adm_crop_resized(self.source.load(int(self.index[i])), self.crop, self.resolution)  # (R, R, 3)
        if self.flip[i]:
            arr = arr[:, ::-1]
        return torch.from_numpy(np.array(arr)).permute(2, 0, 1)  # a writable, contiguous copy

    def __getitem__(self, i: int) -> dict:
        return {**self.cache[i], "image": self.image(i)}

    def __getitems__(self, indices) -> list:
        items = self.cache.__getitems__(indices)
        return [{**item, "image": self.image(i)} for item, i in zip(items, indices)]


def open_recorded_source(cache: LatentCache, override: str = ""):
    """The image source the cache was encoded from (or `override`, the same images moved elsewhere), checked
    against the cache's record so that source index i is still the image row i was encoded from."""
    recorded = cache.meta.get("source", {})
    if recorded.get("type") not in ("image_folder", "hf_dataset"):
        raise ConfigError(f"latent cache {cache.path} records no image source ({recorded.get('type', 'none')}), so "
                          "the teacher cannot see the images behind its latents; alignment needs a cache made by "
                          "`python -m maskdit_ds cache` from an image folder or dataset")
    path = override or recorded["path"]
    try:
        source = open_source(path, recorded.get("split", ""), recorded.get("image_column"),
                             recorded.get("label_column"))
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data.image_source: the images of latent cache {cache.path} ({path}) cannot be opened: "
                          f"{err}") from None
    found = source.describe()
    for key in ("num_images", "fingerprint"):
        if recorded.get(key) is not None and found.get(key) != recorded.get(key):
            raise ConfigError(f"data.image_source: {path} is not the source latent cache {cache.path} was encoded "
                              f"from ({key} {found.get(key)!r}, the cache records {recorded.get(key)!r})")
    return source
