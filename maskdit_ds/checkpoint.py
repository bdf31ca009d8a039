"""Checkpoints: resumable DeepSpeed tags with per-rank training state, and EMA exports (safetensors + config.json).

A tag directory is trusted only once `complete.json` (written last, atomically, after every rank saved) lists
each file with its size and sha256; auto-resume skips tags that fail that check (with a warning), so a killed
save or a truncated or corrupted file never poisons a resume.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import StorageError

TAG_PREFIX = "step_"
MANIFEST = "complete.json"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:07d}"


def step_of(tag: str) -> int:
    return int(tag[len(TAG_PREFIX):])


def list_tags(ckpt_dir: Path) -> list[str]:
    if not Path(ckpt_dir).is_dir():
        return []
    tags = [p.name for p in Path(ckpt_dir).iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX)
            and p.name[len(TAG_PREFIX):].isdigit()]
    return sorted(tags, key=step_of)


def sha256_file(path) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks (checkpoints, VAE and Inception weight files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(tag_dir: Path, meta: dict, hashes: bool = True) -> None:
    """complete.json, written last: each file's size (checked on every scan) and, with hashes, its sha256
    (checked by latest_good_tag on resume; skip it for folders that nothing verifies)."""
    paths = {str(p.relative_to(tag_dir)): p for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != MANIFEST}
    record = {"files": {rel: p.stat().st_size for rel, p in paths.items()}}
    if hashes:
        record["sha256"] = {rel: sha256_file(p) for rel, p in paths.items()}
    atomic_write_text(tag_dir / MANIFEST, json.dumps({**record, **meta}, indent=1))


def check_tag(tag_dir: Path, verify_hashes: bool = False, verify_loads=None) -> str | None:
    """None when the tag is complete; otherwise why it is not. Sizes always; sha256 (reads every byte) on request;
    `verify_loads(tag_dir) -> problem or None` (engine.unsafe_file: every pickle loads under the safe loader)
    on request. complete.json sits in the tag, so hashes catch damage, not tampering: the safe loader does."""
    tag_dir = Path(tag_dir)
    manifest = tag_dir / MANIFEST
    if not manifest.is_file():
        return "no complete.json (the save did not finish)"
    try:
        record = json.loads(manifest.read_text())
        files = record["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable complete.json ({err})"
    for rel, size in files.items():
        path = tag_dir / rel
        if not path.is_file():
            return f"missing {rel}"
        if path.stat().st_size != size:
            return f"{rel} has {path.stat().st_size} bytes, expected {size} (truncated?)"
    if verify_hashes:
        for rel, digest in record.get("sha256", {}).items():
            if sha256_file(tag_dir / rel) != digest:
                return f"{rel} does not match the sha256 recorded in {MANIFEST} (corrupted after the save?)"
    for path in sorted(tag_dir.glob("*.safetensors")):
        problem = unreadable_safetensors(path)
        if problem:
            return problem
    return verify_loads(tag_dir) if verify_loads is not None else None


def unreadable_safetensors(path: Path) -> str | None:
    """Why a .safetensors file's header does not parse (safetensors holds no code; garbage is refused here)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as err:
        return f"{path.name} is not a readable safetensors file ({str(err).splitlines()[0][:160]})"
    return None


def latest_good_tag(ckpt_dir: Path, warn=print, verify_loads=None) -> str | None:
    """Newest tag that passes the size, hash (and `verify_loads`) checks; each skipped tag goes to `warn`."""
    for tag, problem in scan_tags(ckpt_dir, verify_loads, stop_at_good=True):
        if problem is None:
            return tag
        warn(f"[checkpoint] skipping {Path(ckpt_dir) / tag}: {problem}")
    return None


def scan_tags(ckpt_dir: Path, verify_loads=None, stop_at_good: bool = False) -> list[tuple[str, str | None]]:
    """(tag, problem or None), newest first; with stop_at_good, up to the first usable one."""
    out = []
    for tag in reversed(list_tags(ckpt_dir)):
        out.append((tag, check_tag(Path(ckpt_dir) / tag, verify_hashes=True, verify_loads=verify_loads)))
        if stop_at_good and out[-1][1] is None:
            break
    return out


def prune(ckpt_dir: Path, keep: int) -> None:
    good = [t for t in list_tags(ckpt_dir) if check_tag(Path(ckpt_dir) / t) is None]
    for tag in good[:-keep]:
        shutil.rmtree(Path(ckpt_dir) / tag, ignore_errors=True)


# ---------------------------------------------------------------- writes that may fail


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def describe_write_failure(path: Path, what: str, err: BaseException) -> str:
    """'could not write checkpoint runs/x/checkpoints/step_0000010: no space left on device (0.0 GiB free of
    20.0 GiB on that filesystem)': the path, the cause and the free space, in one line."""
    path = Path(path)
    probe = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    usage = shutil.disk_usage(probe)
    code = getattr(err, "errno", None)
    full = code in FULL_ERRNOS or usage.free < 0.01 * usage.total
    cause = os.strerror(code).lower() if code else str(err).splitlines()[0]
    if full and code not in FULL_ERRNOS:
        cause += " (the filesystem is full)"
    return (f"could not write {what} {path}: {cause} ({usage.free / 2**30:.1f} GiB free of "
            f"{usage.total / 2**30:.1f} GiB on that filesystem)")


@contextlib.contextmanager
def storage_guard(path: Path, what: str, cleanup: Path | None = None):
    """Turn a failed write (disk full, quota, I/O error; torch's C++ writer reports them as RuntimeError
    'iostream error' or 'file write failed') into one StorageError naming the path and the free space, after
    removing `cleanup` (the partial result)."""
    try:
        yield
    except StorageError:  # an inner write already named its path
        if cleanup is not None:
            remove(Path(cleanup))
        raise
    except (OSError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not any(k in str(err) for k in ("iostream", "write", "No space")):
            raise
        if cleanup is not None:
            remove(Path(cleanup))
        raise StorageError(describe_write_failure(path, what, err)) from err


def clean_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove what a killed write left behind: '<name>.tmp<pid>' files and folders in the run directory, its
    export/ and its checkpoint tags (the real names are only ever created by a rename)."""
    run_dir, removed = Path(run_dir), []
    places = [run_dir, run_dir / "export", run_dir / "checkpoints",
              *[d for d in (run_dir / "checkpoints").glob(f"{TAG_PREFIX}*") if d.is_dir()]]
    for folder in places:
        for path in folder.glob("*.tmp*") if folder.is_dir() else []:
            if path.name.rsplit(".tmp", 1)[-1].isdigit():
                remove(path)
                removed.append(path)
    return removed


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def list_exports(run_dir: Path) -> list[Path]:
    """export/step_XXXXXXX folders, oldest first (temporaries excluded)."""
    folder = Path(run_dir) / "export"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX)
                  and p.name[len(TAG_PREFIX):].isdigit())


def atomic_write_text(path: Path, text: str) -> None:
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    tmp = Path(f"{path}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    tmp = Path(f"{path}.tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def rank_state_path(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"train_state_rank{rank:03d}.pt"


def save_rank_state(tag_dir: Path, rank: int, state: dict) -> None:
    atomic_torch_save(state, rank_state_path(tag_dir, rank))


def load_rank_state(tag_dir: Path, rank: int) -> dict:
    path = rank_state_path(tag_dir, rank)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint was written by fewer ranks than this run has")
    # weights_only: a tampered run folder must not run code on resume (RNG states are stored as tensors/tuples)
    return torch.load(path, map_location="cpu", weights_only=True)


def export(folder: Path, net: torch.nn.Module, model_cfg, meta: dict) -> Path:
    """Write folder/{config.json, model.safetensors} atomically (a temp folder renamed into place)."""
    return export_state(folder, net.state_dict(), model_cfg, meta)


def export_state(folder: Path, state: dict, model_cfg, meta: dict) -> Path:
    """export() from a state dict (the converters' entry point): fp32 weights + config.json, atomically."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with storage_guard(folder, "export", cleanup=tmp):
        tmp.mkdir(parents=True)
        state = {k: v.float() for k, v in state.items()}
        atomic_save_safetensors(state, tmp / EXPORT_WEIGHTS, metadata={"format": "pt"})
        config = {"format": "maskdit_ds", "version": 1, "model": dataclasses.asdict(model_cfg), **meta}
        atomic_write_text(tmp / EXPORT_CONFIG, json.dumps(config, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def find_export(path: Path) -> Path:
    """An export folder, or a run directory (its newest export)."""
    path = Path(path)
    if (path / EXPORT_CONFIG).is_file() and (path / EXPORT_WEIGHTS).is_file():
        return path
    exports = [e for e in list_exports(path) if (e / EXPORT_WEIGHTS).is_file() and (e / EXPORT_CONFIG).is_file()]
    if not exports:
        raise FileNotFoundError(f"{path}: neither an export folder (config.json + model.safetensors) "
                                f"nor a run directory with export/step_* folders")
    return exports[-1]


def read_export_config(folder: Path) -> dict:
    config = json.loads((Path(folder) / EXPORT_CONFIG).read_text())
    if config.get("format") != "maskdit_ds" or "model" not in config:
        raise ValueError(f"{folder}/config.json is not a maskdit_ds export (format={config.get('format')!r})")
    return config


def load_pretrained(path, device="cpu"):
    """EDMPrecond in eval mode from an export folder or a run directory; `net(x, sigma, class_labels)` -> D."""
    from .config import ModelConfig
    from .model import build_denoiser

    folder = find_export(Path(path))
    config = read_export_config(folder)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    net = build_denoiser(ModelConfig(**{k: v for k, v in config["model"].items() if k in fields}))
    state = load_file(str(folder / EXPORT_WEIGHTS))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}/{EXPORT_WEIGHTS} does not match {config['model']['name']}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return net.to(device).eval().requires_grad_(False)


def warn(message: str) -> None:
    warnings.warn(message, stacklevel=2)
