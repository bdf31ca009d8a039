"""Sample / reference .npz files as ADM's evaluator reads them: arr_0 streamed in batches, optional mu/sigma."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import InputError, one_line
from ..io import atomic_save_npz
from .inception import POOL3_DIM, SPATIAL_DIM
from .metrics import GaussianStats

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


class NpzImages:
    """Lazy view of one array (default arr_0) inside an .npz (np.savez or np.savez_compressed).

    Like ADM's reader it parses the .npy header and streams raw bytes, so a 50k x 512^2 batch (39 GB) is never
    loaded whole. Fortran-order, object or unknown-version arrays fall back to a full np.load, as in ADM.
    """

    def __init__(self, path, key: str = "arr_0"):
        self.path, self.key = Path(path), key
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such .npz file")
        try:
            with zipfile.ZipFile(self.path) as zf:
                self.keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
                if key not in self.keys:
                    raise KeyError(f"{self.path}: no array '{key}' (found keys {self.keys}); images must be saved "
                                   "as np.savez(path, images) or np.savez(path, arr_0=images)")
                with zf.open(f"{key}.npy") as f:
                    self.shape, self.dtype, streamable = _read_npy_header(f)
        except zipfile.BadZipFile as e:
            raise ValueError(f"{self.path}: not a valid .npz (zip) file: {e}") from None
        self._array = None
        if not streamable:  # ADM's fallback: load the whole array (never unpickling: an object array is refused)
            self._array = load_array(self.path, key)
            self.shape, self.dtype = self._array.shape, self._array.dtype

    def __len__(self):
        return self.shape[0] if self.shape else 0

    def batches(self, batch_size: int, limit: int | None = None):
        """Yield arrays of up to batch_size rows, in file order, stopping after `limit` rows."""
        n = len(self) if limit is None else min(limit, len(self))
        if self._array is not None:
            for start in range(0, n, batch_size):
                yield self._array[start:min(start + batch_size, n)]
            return
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as f:
            _read_npy_header(f)
            for start in range(0, n, batch_size):
                batch = np.empty((min(batch_size, n - start), *self.shape[1:]), dtype=self.dtype)
                if f.readinto(memoryview(batch).cast("B")) != batch.nbytes:
                    raise ValueError(f"{self.path}: '{self.key}' ends early at row {start} (file truncated?)")
                yield batch

    def read(self, limit: int | None = None) -> np.ndarray:
        n = len(self) if limit is None else min(limit, len(self))
        return np.concatenate(list(self.batches(4096, n))) if n else np.zeros((0, *self.shape[1:]), self.dtype)


def load_array(path: Path, key: str) -> np.ndarray:
    """One array of an .npz, loaded whole without unpickling: an object array (a pickle, which could run code)
    raises InputError naming the file."""
    try:
        with np.load(path) as npz:
            return npz[key]
    except ValueError as err:  # numpy: "Object arrays cannot be loaded when allow_pickle=False"
        raise InputError(f"{path}: array '{key}' is refused ({one_line(err)}); store plain numeric arrays") from None


def _read_npy_header(f):
    """(shape, dtype, streamable) of an open .npy member; rows can be streamed from C-order, non-object arrays."""
    version = np.lib.format.read_magic(f)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        return None, None, False
    shape, fortran_order, dtype = readers[version](f)
    return shape, dtype, not (fortran_order or dtype.hasobject)


def open_images(path, role: str = "sample", num_images: int | None = None,
                resolution: tuple[int, int] | None = None) -> NpzImages:
    """Open and validate arr_0 as uint8 (N, H, W, 3); fail before any long work with what is wrong and what is wanted.

    num_images: at least this many are required. resolution: (H, W) the images must have (e.g. the reference's).
    """
    arr = NpzImages(path)
    _check_layout(arr, role)
    n, h, w, _ = arr.shape
    if num_images is not None and n < num_images:
        raise ValueError(f"{role} file {arr.path} has {n} images in arr_0, but {num_images} were asked for")
    if resolution is not None and (h, w) != tuple(resolution):
        raise ValueError(f"{role} file {arr.path} has {h}x{w} images, the reference batch has "
                         f"{resolution[0]}x{resolution[1]}; evaluate samples at the reference resolution")
    return arr


def _check_layout(arr: NpzImages, role: str):
    where = f"{role} file {arr.path}, array arr_0"
    if arr.dtype != np.uint8:
        hint = ""
        if arr.dtype.kind == "f" and len(arr):
            first = next(arr.batches(64))
            lo, hi = float(np.min(first)), float(np.max(first))
            hint = (f" (values in [{lo:.3g}, {hi:.3g}]; convert e.g. [-1, 1] images with "
                    "((x + 1) * 127.5).clip(0, 255).astype(np.uint8), or use the baseline's quantisation)")
        raise ValueError(f"{where} has dtype {arr.dtype}, expected uint8 pixels in 0..255{hint}")
    if len(arr.shape) != 4:
        raise ValueError(f"{where} has shape {arr.shape}, expected 4 dims (N, H, W, 3)")
    if arr.shape[-1] != 3:
        hint = " (looks like NCHW; transpose with x.transpose(0, 2, 3, 1))" if arr.shape[1] == 3 else ""
        raise ValueError(f"{where} has shape {arr.shape}, expected NHWC RGB (N, H, W, 3){hint}")
    if len(arr) == 0:
        raise ValueError(f"{where} holds no images")


def read_stats(path, dims=(POOL3_DIM, SPATIAL_DIM)) -> tuple[GaussianStats, GaussianStats] | None:
    """(pool3 stats, spatial stats) from keys mu, sigma, mu_s, sigma_s (upcast to float64), or None if absent.

    dims: the feature dimensions the stats must have (ADM's Inception: 2048 and 2023)."""
    with np.load(path) as npz:
        present = [k for k in STAT_KEYS if k in npz.files]
        if not present:
            return None
        if len(present) != len(STAT_KEYS):
            missing = [k for k in STAT_KEYS if k not in npz.files]
            raise ValueError(f"{path} has statistics keys {present} but lacks {missing}; need all of {STAT_KEYS}")
    pool3 = GaussianStats(load_array(path, "mu"), load_array(path, "sigma"))
    spatial = GaussianStats(load_array(path, "mu_s"), load_array(path, "sigma_s"))
    for name, stats, dim in (("mu/sigma", pool3, dims[0]), ("mu_s/sigma_s", spatial, dims[1])):
        if stats.mu.shape != (dim,):
            raise ValueError(f"{path}: {name} has dimension {stats.mu.shape[0]}, expected {dim} (the feature "
                             "extractor's)")
    return pool3, spatial


def save_reference(path, images: np.ndarray, pool3: GaussianStats, spatial: GaussianStats):
    """Write an ADM-format reference batch: arr_0 (uint8 NHWC, the P/R images) and the FID/sFID statistics."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_npz(path, arr_0=images, mu=pool3.mu, sigma=pool3.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
