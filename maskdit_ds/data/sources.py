"""Image sources for MaskDiT data (docs/method.md §5): an ImageNet-style class folder or a Hugging Face dataset."""

import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .transforms import adm_center_crop, hflip, to_rgb, to_tensor_pm1

# torchvision's ImageFolder extensions, compared case-insensitively (ImageNet uses .JPEG).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Files that mark a folder as a `datasets` save_to_disk output rather than an image folder.
_HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class BadImage(Exception):
    """An image that cannot be decoded; .reason says why. Callers skip and record it."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


def decode_image(data, name: str) -> Image.Image:
    """Open a path or bytes as an RGB PIL image, fully decoded (truncation shows up here, not later).
    Any decoder failure becomes BadImage: third-party PIL plugins raise many exception types."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data) as img:
            img.load()
            return to_rgb(img)
    except Exception as e:  # noqa: BLE001 - the reason is recorded in skipped.jsonl
        raise BadImage(name, f"{type(e).__name__}: {e}") from None


class ImageFolderSource:
    """root/<class>/<...>/<image>; labels are the indices of the sorted class folder names
    (torchvision ImageFolder's rule), images sorted by relative path within a class."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.label_names = sorted(e.name for e in self.root.iterdir() if e.is_dir() and not e.name.startswith("."))
        if not self.label_names:
            raise ValueError(f"image folder {self.root} has no class sub-folders (expected root/<class>/<image>)")
        self.files, self.labels = [], []
        for label, cls in enumerate(self.label_names):
            for rel in self._list_images(cls):
                self.files.append(rel)
                self.labels.append(label)
        if not self.files:
            raise ValueError(f"image folder {self.root} has class folders but no files ending in {IMAGE_EXTENSIONS}")

    def _list_images(self, cls: str) -> list:
        found = []
        # os.walk, not Path.rglob: class folders may be symlinks (followlinks), which rglob skips before 3.13
        for dirpath, dirnames, filenames in os.walk(self.root / cls, followlinks=True):
            dirnames.sort()
            for f in filenames:
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                    found.append(str((Path(dirpath) / f).relative_to(self.root)))
        return sorted(found)

    def __len__(self) -> int:
        return len(self.files)

    def name(self, i: int) -> str:
        return self.files[i]

    def label(self, i: int) -> int:
        return self.labels[i]

    def load(self, i: int) -> Image.Image:
        return decode_image(self.root / self.files[i], self.files[i])

    def describe(self) -> dict:
        # The fingerprint pins the index -> file mapping, so a resumed cache refers to the same images.
        h = hashlib.sha256()
        for f, y in zip(self.files, self.labels):
            h.update(f"{f}\t{y}\n".encode())
        return {"type": "image_folder", "path": str(self.root), "num_images": len(self), "fingerprint": h.hexdigest()}


class HFImageSource:
    """A Hugging Face image dataset: a save_to_disk folder or a hub name (e.g. the imagenet-1k parquet
    layout with an Image column "image" and a ClassLabel column "label")."""

    def __init__(self, name_or_path: str, split: str = "train", image_column: str = None, label_column: str = None):
        import datasets

        self.spec = name_or_path
        if Path(name_or_path).is_dir():
            self.spec = str(Path(name_or_path).absolute())
            ds = datasets.load_from_disk(name_or_path)
        else:
            ds = datasets.load_dataset(name_or_path, split=split)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"dataset {name_or_path} has splits {sorted(ds)}, not {split!r}")
            ds = ds[split]
        self.split = split
        self.image_column = image_column or _find_column(ds, datasets.Image, ("image", "img", "jpg", "png"), "image", name_or_path)
        self.label_column = label_column or _find_column(ds, datasets.ClassLabel, ("label", "labels", "cls", "class"), "label", name_or_path)
        feature = ds.features[self.label_column]
        ds = ds.select_columns([self.image_column, self.label_column])
        # Decode ourselves so that a broken image becomes a recorded skip instead of an exception inside datasets.
        self.ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        # Through Arrow: a `datasets` Column iterates row by row (~12 s for ImageNet's 1.28M labels).
        self.labels = np.asarray(ds.select_columns([self.label_column]).with_format("arrow")[:][self.label_column],
                                 dtype=np.int64)
        if len(self.labels) and self.labels.min() < 0:
            raise ValueError(f"dataset {name_or_path} split {split!r}: column {self.label_column!r} has negative labels "
                             f"(min {self.labels.min()}); an unlabeled split cannot be used for class-conditional training")
        if isinstance(feature, datasets.ClassLabel):
            self.label_names = list(feature.names)
        else:
            self.label_names = [str(k) for k in range(int(self.labels.max(initial=-1)) + 1)]
        self.fingerprint = getattr(ds, "_fingerprint", None)

    def __len__(self) -> int:
        return len(self.ds)

    def name(self, i: int) -> str:
        return f"{self.split}[{i}]"

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def load(self, i: int) -> Image.Image:
        cell = self.ds[i][self.image_column]
        if cell is None:
            raise BadImage(self.name(i), "empty image cell")
        if isinstance(cell, dict):
            data = cell.get("bytes") or cell.get("path")
        else:
            data = cell
        if data is None:
            raise BadImage(self.name(i), "image cell has neither bytes nor path")
        return decode_image(data, self.name(i))

    def describe(self) -> dict:
        return {"type": "hf_dataset", "path": self.spec, "split": self.split, "image_column": self.image_column,
                "label_column": self.label_column, "num_images": len(self), "fingerprint": self.fingerprint}


def _find_column(ds, feature_type, names, what, spec):
    """The column of the given feature type, else the first conventional name present."""
    typed = [k for k, v in ds.features.items() if isinstance(v, feature_type)]
    if len(typed) == 1:
        return typed[0]
    for n in names:
        if n in ds.features:
            return n
    raise ValueError(f"dataset {spec}: cannot tell which column holds the {what}; columns are {list(ds.features)}; "
                     f"pass the column name explicitly")


def open_source(spec: str, split: str = "train", image_column: str = None, label_column: str = None):
    """Folder with class sub-folders -> ImageFolderSource (root/<split>/ is used when it exists);
    a save_to_disk folder -> HFImageSource; "hf:<name>" or a non-path name -> hub dataset."""
    if spec.startswith("hf:"):
        return HFImageSource(spec[3:], split, image_column, label_column)
    if Path(spec).is_dir():
        if any((Path(spec) / m).exists() for m in _HF_DISK_MARKERS):
            return HFImageSource(spec, split, image_column, label_column)
        sub = Path(spec) / split if split else Path(spec)
        return ImageFolderSource(sub if sub.is_dir() else spec)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:  # a hub name is "name" or "org/name"
        raise FileNotFoundError(f"data source {spec} does not exist (expected an image folder, a save_to_disk folder or hf:<name>)")
    return HFImageSource(spec, split, image_column, label_column)


class ImageDataset(torch.utils.data.Dataset):
    """Pixel-space map-style dataset: item i -> {"x": float32 (3, res, res) in [-1, 1], "y": int64}.
    An undecodable image is replaced by the next decodable one, with a warning naming it."""

    def __init__(self, source, resolution: int, random_flip: bool = False, max_bad_in_a_row: int = 64):
        if isinstance(source, str):  # a path or hf:<name>, as open_source takes it
            source = open_source(source)
        self.source, self.resolution, self.random_flip = source, resolution, random_flip
        self.max_bad_in_a_row = max_bad_in_a_row

    def __len__(self) -> int:
        return len(self.source)

    def labels(self) -> torch.Tensor:
        """All labels as int64 (N,) without decoding any image."""
        return torch.from_numpy(np.array(self.source.labels, dtype=np.int64))  # a writable copy

    def __getitem__(self, i: int) -> dict:
        for k in range(self.max_bad_in_a_row):
            j = (i + k) % len(self.source)
            try:
                x = to_tensor_pm1(adm_center_crop(self.source.load(j), self.resolution))
            except BadImage as e:
                warnings.warn(f"ImageDataset: skipping undecodable image {e}; using the next one", stacklevel=2)
                continue
            if self.random_flip and torch.rand(()) < 0.5:
                x = hflip(x)
            return {"x": x, "y": torch.tensor(self.source.label(j), dtype=torch.int64)}
        raise RuntimeError(f"ImageDataset: {self.max_bad_in_a_row} undecodable images in a row from index {i}; "
                           f"check the source ({self.source.describe()['path']})")
