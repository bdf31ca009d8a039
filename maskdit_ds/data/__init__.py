"""Datasets for training (docs/method.md §5): the built-in digits, latent caches and image sources, by data.source."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset, Subset

from ..registry import Registry
from .digits import DigitsDataset, DigitsJudge
from .loader import ResumableLoader, ResumableSampler


def select(dataset: Dataset, labels: torch.Tensor, classes: list, fraction: float, seed: int) -> Dataset:
    """Keep the given classes (all if empty), then a seeded random fraction of what is left."""
    keep = torch.arange(len(labels))
    if classes:
        keep = keep[torch.isin(labels, torch.tensor(classes))]
    if fraction < 1.0:
        order = torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))
        keep = keep[order[: max(1, int(len(keep) * fraction))]].sort().values
    if len(keep) == len(labels):
        return dataset
    return Subset(dataset, keep.tolist())


def _digits(data_cfg, model_cfg):
    ds = DigitsDataset(data_cfg.resolution)
    return ds, ds.y


def _latents(data_cfg, model_cfg):
    from .latent_cache import LatentCache

    ds = LatentCache(data_cfg.path)
    ds.check_compatible(data_cfg.resolution, model_cfg.in_channels)
    return ds, ds.labels()


def _images(data_cfg, model_cfg):
    from .sources import ImageDataset

    # hf: a saved dataset folder, or a hub name such as "imagenet-1k" (needs the hub or its cache)
    hub_name = data_cfg.source == "hf" and not Path(data_cfg.path).exists()
    ds = ImageDataset(f"hf:{data_cfg.path}" if hub_name else data_cfg.path, data_cfg.resolution)
    return ds, ds.labels()


@dataclass(frozen=True)
class DataSource:
    """One data.source. build(data_cfg, model_cfg) -> (dataset of {"x", "y"}, labels (N,) int64); latent: its items
    are VAE posterior moments (2C channels: a fresh latent is drawn each step, pictures are decoded through
    data.vae); needs_path: it reads data.path; local_path: that path must exist here (hf also takes hub names)."""

    build: Callable
    latent: bool
    needs_path: bool
    local_path: bool


# latents: a cache made by `maskdit_ds cache`; digits: the built-in example; images: a folder root/<class>/<image>;
# hf: a saved or hub Hugging Face dataset
DATA_SOURCES: Registry[DataSource] = Registry("data source")  # data.source
DATA_SOURCES.register("latents", DataSource(_latents, latent=True, needs_path=True, local_path=True))
DATA_SOURCES.register("digits", DataSource(_digits, latent=False, needs_path=False, local_path=False))
DATA_SOURCES.register("images", DataSource(_images, latent=False, needs_path=True, local_path=True))
DATA_SOURCES.register("hf", DataSource(_images, latent=False, needs_path=True, local_path=False))


def build_dataset(data_cfg, model_cfg, seed: int = 0, images_at: int = 0) -> Dataset:
    """A map-style dataset of {"x", "y"} for the configured source, checked against the model config.
    images_at > 0 (an aligned run on latents): items also carry "image", the source image as uint8 at that
    resolution (pixel sources need none: their "x" is the image)."""
    ds, labels = DATA_SOURCES[data_cfg.source].build(data_cfg, model_cfg)
    if images_at and data_cfg.kind.latent:
        from .source_images import LatentsWithImages

        ds = LatentsWithImages(ds, images_at, data_cfg.image_source)
    channels = model_cfg.in_channels * (2 if data_cfg.kind.latent else 1)  # caches hold mean + logvar
    expected = (channels, model_cfg.input_size, model_cfg.input_size)
    if tuple(ds[0]["x"].shape) != expected:
        raise ValueError(f"data.source={data_cfg.source}: items have shape {tuple(ds[0]['x'].shape)}, but model "
                         f"{model_cfg.name} with in_channels={model_cfg.in_channels} and input_size="
                         f"{model_cfg.input_size} expects {expected}")
    return select(ds, labels, list(data_cfg.classes), data_cfg.fraction, seed)


def teacher_input(batch: dict, x: torch.Tensor) -> torch.Tensor:
    """What the alignment teacher sees: the served source image beside a latent, else the pixel input itself."""
    return batch["image"] if "image" in batch else x


def to_model_input(x: torch.Tensor, data_cfg) -> torch.Tensor:
    """Latent caches hold posterior moments: draw a fresh scaled latent every step. Pixels pass through."""
    if data_cfg.kind.latent:
        from .latent_cache import sample_latent

        return sample_latent(x, scale=data_cfg.latent_scale)
    return x


from .latent_cache import LatentCache, encode_to_cache, sample_latent  # noqa: E402
from .release_import import RefusedPickle, import_release, open_release  # noqa: E402
from .sources import BadImage, HFImageSource, ImageDataset, ImageFolderSource, open_source  # noqa: E402
from .transforms import adm_center_crop  # noqa: E402
from .vae import encode_moments, load_vae  # noqa: E402

__all__ = ["DATA_SOURCES", "DataSource", "LatentCache", "encode_to_cache", "sample_latent", "RefusedPickle",
           "import_release", "open_release",
           "BadImage", "HFImageSource", "ImageDataset", "ImageFolderSource", "open_source", "adm_center_crop",
           "encode_moments", "load_vae",
           "DigitsDataset", "DigitsJudge", "ResumableLoader", "ResumableSampler", "build_dataset", "to_model_input",
           "select", "teacher_input"]
