"""The ground floor: atomic writes, sha256 of files, and one guard for failed writes. Every layer may import it.

Atomic: write to '<name>.tmp<pid>' next to the target, then rename over it, so a reader (or a resume after a
kill) sees the old file or the new one, never half of one. clean_stale_temporaries() removes what a killed
write left. Every write goes through atomic_path (or, for writes into a folder another library owns,
storage_guard), which turns a full disk, a quota or an I/O error into one StorageError whatever library raised it.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from .errors import StorageError, is_storage_failure

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def temp_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def is_temp_name(name: str) -> bool:
    return ".tmp" in name and name.rsplit(".tmp", 1)[-1].isdigit()


@contextlib.contextmanager
def atomic_path(path: Path, what: str = "file"):
    """Yields a temporary path to write `path`'s new content to (a file or a folder); renamed over `path` when the
    block ends normally, removed when it raises. A failed write raises StorageError naming `what` and `path`."""
    path, tmp = Path(path), temp_path(path)
    with storage_guard(path, what, cleanup=tmp):
        remove(tmp)
        try:
            yield tmp
        except BaseException:
            remove(tmp)
            raise
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)  # os.replace cannot replace a non-empty folder
        os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: Path, obj, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent))


def atomic_torch_save(obj, path: Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_save_npz(path: Path, **arrays) -> None:
    """np.savez to `path` exactly (a file object keeps numpy from appending '.npz'), atomically."""
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def atomic_save_image(image, path: Path) -> None:
    """A PIL image to `path` (its format from the suffix), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG"))


def atomic_save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def remove(path: Path) -> None:
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale_temporaries(folders) -> list[Path]:
    """Remove '<name>.tmp<pid>' files and folders (left by killed writes) directly inside `folders`."""
    removed = []
    for folder in map(Path, folders):
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if is_temp_name(path.name):
                remove(path)
                removed.append(path)
    return removed


def sha256_file(path) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks (checkpoints, VAE and Inception weight files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_write_failure(path: Path, what: str, err: BaseException) -> str:
    """'could not write checkpoint runs/x/checkpoints/step_0000010: no space left on device (0.0 GiB free of
    20.0 GiB on that filesystem)': the path, the cause and the free space, in one line."""
    path = Path(path)
    probe = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    usage = shutil.disk_usage(probe)
    code = getattr(err, "errno", None)
    if code is None:  # Rust writers (safetensors) end their message with "(os error 28)"
        found = re.search(r"\(os error (\d+)\)", str(err))
        code = int(found.group(1)) if found else None
    full = code in FULL_ERRNOS or usage.free < 0.01 * usage.total
    cause = os.strerror(code).lower() if code else (str(err).strip().splitlines() or [type(err).__name__])[0]
    if full and code not in FULL_ERRNOS:
        cause += " (the filesystem is full)"
    return (f"could not write {what} {path}: {cause} ({usage.free / 2**30:.1f} GiB free of "
            f"{usage.total / 2**30:.1f} GiB on that filesystem)")


@contextlib.contextmanager
def storage_guard(path: Path, what: str, cleanup: Path | None = None):
    """Turn a failed write (disk full, quota, I/O error), whatever library reports it and however
    (errors.is_storage_failure: OSError, torch's C++ zip writer, safetensors' Rust writer, pyarrow), into one
    StorageError naming the path and the free space, after removing `cleanup` (the partial result)."""
    try:
        yield
    except StorageError:  # an inner write already named its path
        if cleanup is not None:
            remove(cleanup)
        raise
    except Exception as err:
        if not is_storage_failure(err):
            raise
        if cleanup is not None:
            remove(cleanup)
        raise StorageError(describe_write_failure(path, what, err)) from err
