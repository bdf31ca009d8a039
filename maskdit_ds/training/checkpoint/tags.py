"""A checkpoint tag on disk: <run_dir>/checkpoints/step_XXXXXXX/ with DeepSpeed's ZeRO state, one training-state
file per rank, the EMA, the config it was trained with, and complete.json.

A tag directory is trusted only once `complete.json` (written last, atomically, after every rank saved) lists
each file with its size and sha256; auto-resume skips tags that fail that check (with a warning), so a killed
save or a truncated or corrupted file never poisons a resume.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from ... import dist, io
from ...io import sha256_file
from ...model.export import step_folders

MANIFEST = "complete.json"
EMA_FILE = "ema.safetensors"


def list_tags(ckpt_dir: Path) -> list[str]:
    """Tag names (step_XXXXXXX) in a checkpoints/ folder, oldest first, whether complete or not."""
    return [folder.name for folder in step_folders(ckpt_dir)]


def write_manifest(tag_dir: Path, meta: dict, hashes: bool = True) -> None:
    """complete.json, written last: each file's size (checked on every scan) and, with hashes, its sha256
    (checked by latest_good_tag on resume; skip it for folders that nothing verifies)."""
    paths = {str(p.relative_to(tag_dir)): p for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != MANIFEST}
    record = {"files": {rel: p.stat().st_size for rel, p in paths.items()}}
    if hashes:
        record["sha256"] = {rel: sha256_file(p) for rel, p in paths.items()}
    io.atomic_write_text(tag_dir / MANIFEST, json.dumps({**record, **meta}, indent=1))


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


def latest_good_tag(ckpt_dir: Path, warn=dist.say, verify_loads=None) -> str | None:
    """Newest tag that passes the size, hash (and `verify_loads`) checks; each skipped tag goes to `warn`."""
    for tag, problem in scan_tags(ckpt_dir, verify_loads):
        if problem is None:
            return tag
        warn(f"[checkpoint] skipping {Path(ckpt_dir) / tag}: {problem}")
    return None


def scan_tags(ckpt_dir: Path, verify_loads=None) -> list[tuple[str, str | None]]:
    """(tag, problem or None), newest first, up to the first usable one."""
    out = []
    for tag in reversed(list_tags(ckpt_dir)):
        out.append((tag, check_tag(Path(ckpt_dir) / tag, verify_hashes=True, verify_loads=verify_loads)))
        if out[-1][1] is None:
            break
    return out


def prune(ckpt_dir: Path, keep: int) -> None:
    good = [t for t in list_tags(ckpt_dir) if check_tag(Path(ckpt_dir) / t) is None]
    for tag in good[:-keep]:
        shutil.rmtree(Path(ckpt_dir) / tag, ignore_errors=True)


def clean_stale_temporaries(run_dir: Path) -> list[Path]:
    """What a killed write left in a run directory, its export/ and its checkpoint tags (io.is_temp_name)."""
    run_dir = Path(run_dir)
    tags = step_folders(run_dir / "checkpoints")
    return io.clean_stale_temporaries([run_dir, run_dir / "export", run_dir / "checkpoints", *tags])


def rank_state_path(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"train_state_rank{rank:03d}.pt"


def save_rank_state(tag_dir: Path, rank: int, state: dict) -> None:
    io.atomic_torch_save(state, rank_state_path(tag_dir, rank))


def load_rank_state(tag_dir: Path, rank: int) -> dict:
    path = rank_state_path(tag_dir, rank)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint was written by fewer ranks than this run has")
    # weights_only: a tampered run folder must not run code on resume (RNG states are stored as tensors/tuples)
    return torch.load(path, map_location="cpu", weights_only=True)


def save_ema(ema: torch.nn.Module, tag_dir: Path) -> None:
    """The EMA's fp32 weights (the denoiser's state dict, as exports name them) into the tag."""
    io.atomic_save_safetensors(ema.state_dict(), Path(tag_dir) / EMA_FILE)


def load_ema(ema: torch.nn.Module, tag_dir: Path) -> None:
    ema.load_state_dict(load_file(str(Path(tag_dir) / EMA_FILE)))
