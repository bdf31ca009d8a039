"""Import the public MaskDiT latent releases (256 px LMDB, 512 px WebDataset tars) into our latent cache format.

256 px LMDB: b"length" -> ASCII count; b"z-{i}" -> raw float32 bytes of the (8, 32, 32) moments; b"y-{i}" -> ASCII label.
512 px WebDataset: tar members "<key>.latent" (a pickled numpy array (8, 64, 64)) and "<key>.cls" (an int as
text or pickled). Pickles are read only through RestrictedUnpickler, which rebuilds numpy arrays and nothing else.
"""

import glob
import hashlib
import importlib
import io
import pickle
import re
import tarfile
import time
from pathlib import Path

import numpy as np

from ..errors import InputError
from .latent_cache import cache_plan, finalize_cache, finished_shards, prepare_cache, read_meta, shard_range, write_shard

# The globals a pickled numpy array or numpy scalar needs, under numpy 1 and numpy 2 module names.
# _frombuffer is what protocol-5 pickles of arrays call; it only wraps a byte buffer as an array.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}
_NUMPY_CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"


class RefusedPickle(InputError, pickle.UnpicklingError):
    """A pickle asked for something other than a numpy array; it was not loaded."""


def _latin1_encode(text, encoding="latin1"):
    """Protocol-2 pickles of arrays store their bytes as a latin-1 str and call _codecs.encode(s, "latin1");
    this stand-in does only that, so no other codec can be reached through the pickle."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise RefusedPickle(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not a numpy array payload")
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only numpy's array-reconstruction globals and refuses all others
    (os.system, builtins.eval, ...) before anything is called."""

    def __init__(self, file, what: str = "pickle"):
        super().__init__(file)
        self.what = what

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) not in _ALLOWED:
            raise RefusedPickle(f"{self.what}: refusing to unpickle {module}.{name}; only numpy arrays and numpy "
                                f"scalars may be loaded from released latents (the file may be malicious or not a latent)")
        return getattr(importlib.import_module(module.replace("numpy.core", "numpy._core").replace("numpy._core", _NUMPY_CORE)), name)

    def persistent_load(self, pid):
        raise RefusedPickle(f"{self.what}: refusing a pickle with persistent id {pid!r}")


def safe_unpickle(data: bytes, what: str = "pickle"):
    return RestrictedUnpickler(io.BytesIO(data), what).load()


def _as_moments(obj, what: str, shape=None) -> np.ndarray:
    """A loaded value -> float32 (2C, h, w) moments, or a clear error."""
    if not isinstance(obj, np.ndarray) or obj.dtype.kind not in "fiu":
        raise ValueError(f"{what}: expected a numeric numpy array of moments, got {type(obj).__name__}"
                         f"{' of dtype ' + str(obj.dtype) if isinstance(obj, np.ndarray) else ''}")
    if obj.ndim != 3 or obj.shape[0] % 2 or (shape is not None and obj.shape != shape):
        raise ValueError(f"{what}: moments have shape {obj.shape}, expected {shape or '(2C, h, w)'}")
    return obj.astype(np.float32, copy=False)


class LMDBLatents:
    """The 256 px MaskDiT LMDB release as a random-access list of (moments float32 (8, h, w), label)."""

    def __init__(self, path: str, latent_channels: int = 4):
        try:
            import lmdb
        except ImportError:
            raise InputError(f"reading the MaskDiT LMDB release {path} needs the `lmdb` package: pip install lmdb") from None
        if not Path(path).exists():
            raise FileNotFoundError(f"LMDB {path} does not exist")
        self.path = str(Path(path).absolute())
        self.env = lmdb.open(self.path, readonly=True, lock=False, readahead=False, subdir=Path(path).is_dir())
        with self.env.begin() as txn:
            length = txn.get(b"length")
            if length is None:
                raise ValueError(f"LMDB {path} has no b'length' key; is it a MaskDiT latent LMDB?")
            self.n = int(length.decode())
            first = txn.get(b"z-0")
        if self.n <= 0 or first is None:
            raise ValueError(f"LMDB {path}: length {self.n}, key b'z-0' {'missing' if first is None else 'present'}")
        c = 2 * latent_channels
        side = int(round((len(first) / 4 / c) ** 0.5))
        if c * side * side * 4 != len(first):
            raise ValueError(f"LMDB {path} key b'z-0': {len(first)} bytes is not float32 ({c}, h, h) moments")
        self.shape = (c, side, side)

    def __len__(self) -> int:
        return self.n

    def get(self, i: int):
        with self.env.begin() as txn:
            z, y = txn.get(f"z-{i}".encode()), txn.get(f"y-{i}".encode())
        if z is None or y is None:
            raise ValueError(f"LMDB {self.path}: key {'z' if z is None else 'y'}-{i} missing (length says {self.n})")
        want = int(np.prod(self.shape)) * 4
        if len(z) != want:
            raise ValueError(f"LMDB {self.path} key z-{i}: {len(z)} bytes, expected {want} (float32 {self.shape})")
        return np.frombuffer(z, dtype=np.float32).reshape(self.shape), _parse_label(y, f"LMDB {self.path} key y-{i}")

    def describe(self) -> dict:
        h = hashlib.sha256(f"{self.n}".encode())
        with self.env.begin() as txn:
            for key in (b"z-0", f"z-{self.n - 1}".encode(), b"y-0", f"y-{self.n - 1}".encode()):
                h.update(txn.get(key) or b"")
        return {"type": "maskdit_lmdb", "path": self.path, "num_images": self.n, "fingerprint": h.hexdigest()}


def _parse_label(data: bytes, what: str) -> int:
    """An int label stored as ASCII text or as a pickled int / numpy integer."""
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        pass
    obj = safe_unpickle(data, what)
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, bool):
        return int(obj)
    if isinstance(obj, np.ndarray) and obj.size == 1 and obj.dtype.kind in "iu":
        return int(obj.reshape(()))
    raise ValueError(f"{what}: expected an integer class label, got {type(obj).__name__}")


_WDS_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's rule: key = path up to the first dot of the basename


class WDSLatents:
    """The 512 px MaskDiT WebDataset release: tar shards of <key>.latent + <key>.cls, indexed once by
    member offsets so that entries can be read in any order without unpacking the tars."""

    def __init__(self, paths):
        self.tars = _expand_tars(paths)
        keys, where = [], []  # where[i] = (tar index, latent offset, latent size, cls offset, cls size)
        for t, path in enumerate(self.tars):
            with tarfile.open(path, mode="r:") as tf:
                groups = {}
                for m in tf:
                    if not m.isfile():
                        continue
                    match = _WDS_NAME.match(m.name)
                    if match:
                        groups.setdefault(match[1], {})[match[2]] = (m.offset_data, m.size)
            for key, parts in groups.items():
                if "latent" not in parts or "cls" not in parts:
                    raise ValueError(f"{path}: sample {key!r} has members {sorted(parts)}, needs both .latent and .cls")
                keys.append(f"{Path(path).name}:{key}")
                where.append((t, *parts["latent"], *parts["cls"]))
        if not keys:
            raise ValueError(f"no .latent/.cls samples found in {self.tars}")
        self.keys, self.where = keys, np.asarray(where, dtype=np.int64)
        self._files, self.shape = {}, None
        self.shape = self.get(0)[0].shape  # every later sample must match the first

    def __len__(self) -> int:
        return len(self.keys)

    def _read(self, t: int, offset: int, size: int) -> bytes:
        f = self._files.get(t)
        if f is None:
            f = self._files[t] = open(self.tars[t], "rb")
        f.seek(offset)
        return f.read(size)

    def get(self, i: int):
        t, lo, ls, co, cs = (int(v) for v in self.where[i])
        what = f"{self.tars[t]} sample {self.keys[i].split(':', 1)[1]!r}"
        z = _as_moments(safe_unpickle(self._read(t, lo, ls), what + " .latent"), what + " .latent", self.shape)
        return z, _parse_label(self._read(t, co, cs), what + " .cls")

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def describe(self) -> dict:
        h = hashlib.sha256()
        for p, k in zip(self.tars, [Path(p).stat().st_size for p in self.tars]):
            h.update(f"{Path(p).name}:{k}\n".encode())
        return {"type": "maskdit_wds", "path": [str(Path(p).absolute()) for p in self.tars], "num_images": len(self),
                "fingerprint": h.hexdigest()}


def _expand_tars(paths) -> list:
    """Files, folders (every *.tar inside, sorted) and glob patterns -> a list of tar paths."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    tars = []
    for p in paths:
        if Path(p).is_dir():
            tars += sorted(str(t) for t in Path(p).glob("*.tar"))
        elif Path(p).is_file():
            tars.append(p)
        else:
            found = sorted(glob.glob(p))
            if not found:
                raise FileNotFoundError(f"no tar shards match {p}")
            tars += found
    if not tars:
        raise FileNotFoundError(f"no .tar files in {paths}")
    return tars


def open_release(path) -> object:
    """An LMDB folder/file -> LMDBLatents; tar files, folders of tars or globs -> WDSLatents."""
    if isinstance(path, str) and ((Path(path) / "data.mdb").is_file() or path.endswith(".mdb")):
        return LMDBLatents(path)
    if isinstance(path, str) and Path(path).is_dir() and not any(Path(path).glob("*.tar")):
        raise ValueError(f"{path} is neither an LMDB (has no data.mdb) nor a folder of .tar shards")
    return WDSLatents(path)


def import_release(reader, out: str, resolution: int = None, num_classes: int = 1000,
                     moments_dtype: str = "float32", shard_size: int = 4096, vae_id: str = None,
                     progress: bool = True) -> dict:
    """Copy the paper's latent release into a validated latent cache at `out` (resumable by shard)."""
    c2, h, _ = reader.shape
    downsample = 8  # SD KL-f8, the VAE both releases were made with
    resolution = resolution or h * downsample
    if resolution != h * downsample:
        raise ValueError(f"released latents are {h}x{h}, which is {h * downsample} px with the KL-f8 VAE, not {resolution}")
    vae_info = {"id": vae_id or "MaskDiT latent release (SD KL-f8; exact weights not recorded)", "sha256": None,
                "hash_of": None, "dtype": None, "latent_channels": c2 // 2, "downsample": downsample,
                "scaling_factor": 0.18215}
    plan = cache_plan(resolution, vae_info, moments_dtype, [str(k) for k in range(num_classes)], reader.describe(),
                      len(reader), shard_size)
    prepare_cache(out, plan)
    if (Path(out) / "meta.json").is_file():
        return {"status": "complete", "imported": 0, "meta": read_meta(out)}
    from tqdm import tqdm

    t0, done = time.time(), finished_shards(out)
    todo = [k for k in range(plan["num_shards"]) if k not in done]
    bar = tqdm(total=sum(len(shard_range(k, plan)) for k in todo), unit="latent", disable=not progress)
    imported = 0
    for k in todo:
        idx = list(shard_range(k, plan))
        z = np.empty((len(idx), *reader.shape), dtype=moments_dtype)
        labels = np.empty(len(idx), dtype=np.int64)
        for j, i in enumerate(idx):
            z[j], labels[j] = reader.get(i)
            bar.update(1)
        write_shard(out, k, plan, z, labels, idx, np.zeros(len(idx), bool), skipped=[])
        imported += len(idx)
    bar.close()
    meta = finalize_cache(out, plan)
    seconds = time.time() - t0
    return {"status": "complete", "imported": imported, "seconds": seconds, "meta": meta}
