"""Reference batches: load ADM's (with a cache of arr_0 activations) or build one for a new dataset."""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..data.transforms import adm_center_crop
from ..errors import StorageError
from ..io import atomic_save_npz, sha256_file
from .extractor import InceptionExtractor
from .metrics import GaussianStats, RunningGaussian, gaussian_stats
from .npz_io import NpzImages, open_images, read_stats, save_reference

CACHE_VERSION = 1  # bump when the feature computation changes, so stale caches are not reused
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass
class ReferenceStats:
    """What FID/sFID need from a reference batch."""

    pool3: GaussianStats  # 2048-d (mu, sigma)
    spatial: GaussianStats  # 2023-d (mu_s, sigma_s)
    source: str  # "npz" (stored whole-dataset stats, ADM) or "arr_0" (computed from the P/R images)


@dataclass
class ReferenceBatch:
    """A loaded reference batch: stats for FID/sFID plus the arr_0 pool3 activations for precision/recall."""

    path: Path
    sha256: str
    stats: ReferenceStats
    pool3: np.ndarray  # (M, 2048) float32
    resolution: tuple[int, int]


def _cache_file(ref: Path, ref_sha: str, weights_sha: str | None, cache_dir) -> Path:
    folder = Path(cache_dir) if cache_dir is not None else ref.parent
    return folder / f"{ref.stem}.acts-{ref_sha[:16]}-{(weights_sha or 'unverified')[:16]}-v{CACHE_VERSION}.npz"


def _reference_activations(images: NpzImages, ref_sha: str, extractor: InceptionExtractor, cache_dir,
                           use_cache: bool, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """(pool3 (M, 2048), spatial (M, 2023)) features of arr_0, cached next to the ref file (or in cache_dir),
    keyed by the ref file's and the weights' sha256. Unverified weights are never cached."""
    cache = _cache_file(images.path, ref_sha, extractor.weights_sha256, cache_dir)
    if use_cache and extractor.weights_sha256 and cache.is_file():
        with np.load(cache) as c:
            if c["pool3"].shape[0] == len(images):
                return c["pool3"], c["spatial"]
    acts = extractor.run(images.batches(extractor.batch_size), total=len(images), desc="reference", progress=progress)
    if use_cache and extractor.weights_sha256:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_save_npz(cache, pool3=acts.pool3, spatial=acts.spatial)
        except (OSError, StorageError) as e:  # a cache: the evaluation goes on without it
            warnings.warn(f"could not write the reference activation cache {cache}: {e}")
    return acts.pool3, acts.spatial


def load_reference(path, extractor: InceptionExtractor, cache_dir=None, use_cache: bool = True,
                   progress: bool = True) -> ReferenceBatch:
    """Read an ADM reference batch. FID/sFID use its stored mu/sigma/mu_s/sigma_s when present (never recomputed);
    arr_0 always goes through Inception because precision/recall need its activations."""
    images = open_images(path, role="reference")
    stored = read_stats(path, extractor.feature_dims)
    ref_sha = sha256_file(path)
    pool3, spatial = _reference_activations(images, ref_sha, extractor, cache_dir, use_cache, progress)
    if stored is not None:
        stats = ReferenceStats(stored[0], stored[1], "npz")
    else:
        stats = ReferenceStats(gaussian_stats(pool3), gaussian_stats(spatial), "arr_0")
    return ReferenceBatch(Path(path), ref_sha, stats, pool3, tuple(images.shape[1:3]))


def load_reference_stats(path, extractor: InceptionExtractor | None = None, cache_dir=None,
                         progress: bool = False) -> ReferenceStats:
    """FID/sFID reference statistics for in-training FID. Needs no extractor when the file stores mu/sigma."""
    stored = read_stats(path) if extractor is None else read_stats(path, extractor.feature_dims)
    if stored is not None:
        open_images(path, role="reference")  # still validate the file
        return ReferenceStats(stored[0], stored[1], "npz")
    if extractor is None:
        raise ValueError(f"{path} has no mu/sigma/mu_s/sigma_s; pass an extractor to compute them from arr_0")
    return load_reference(path, extractor, cache_dir, progress=progress).stats


# ---------------------------------------------------------------------------------------------------------------
# Building a reference batch for a dataset ADM never published.


def list_images(folder) -> list[Path]:
    """Image files under `folder`, recursively, in sorted order (so arr_0's order is reproducible)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return files


def _load_image(path: Path, resolution: int | None) -> np.ndarray:
    with Image.open(path) as im:
        return adm_center_crop(im, resolution) if resolution else np.asarray(im.convert("RGB"))


def _folder_batches(files: list[Path], resolution: int | None, batch_size: int, workers: int):
    shape = None
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes and resizes without the GIL
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            arrays = list(pool.map(lambda p: _load_image(p, resolution), chunk))
            for path, a in zip(chunk, arrays):
                shape = shape or a.shape
                if a.shape != shape:
                    raise ValueError(f"{path} is {a.shape[1]}x{a.shape[0]}, earlier images are {shape[1]}x{shape[0]};"
                                     " pass a resolution to centre-crop every image to one size")
            yield np.stack(arrays)


def _npz_batches(images: NpzImages, resolution: int | None, batch_size: int):
    for batch in images.batches(batch_size):
        if resolution and batch.shape[1:3] != (resolution, resolution):
            batch = np.stack([adm_center_crop(Image.fromarray(a), resolution) for a in batch])
        yield batch


def build_reference(source, out, extractor: InceptionExtractor, resolution: int | None = None,
                    keep: int = 10_000, workers: int = 8, progress: bool = True) -> Path:
    """Write an ADM-format reference .npz from a folder of images or an .npz of real images (arr_0 uint8 NHWC).

    Like OpenAI's VIRTUAL batches: mu/sigma/mu_s/sigma_s over ALL images (streamed, float64), arr_0 = the first
    `keep` images (used only for precision/recall). `resolution` applies ADM's centre crop to every image.
    """
    source = Path(source)
    if source.is_dir():
        files = list_images(source)
        total, batches = len(files), _folder_batches(files, resolution, extractor.batch_size, workers)
    else:
        images = open_images(source, role="real-image")
        total, batches = len(images), _npz_batches(images, resolution, extractor.batch_size)
    if total < 2:
        raise ValueError(f"{source} holds {total} image(s); statistics need at least 2")
    pool3, spatial, kept, kept_count = RunningGaussian(), RunningGaussian(), [], 0
    with tqdm(total=total, desc="reference", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for batch in batches:
            acts = extractor(batch)
            pool3.update(acts.pool3)
            spatial.update(acts.spatial)
            if kept_count < keep:
                kept.append(batch[:keep - kept_count])
                kept_count += len(kept[-1])
            bar.update(len(batch))
    save_reference(out, np.concatenate(kept), pool3.stats(), spatial.stats())
    return Path(out)
