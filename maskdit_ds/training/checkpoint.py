"""Checkpoint tags: resumable DeepSpeed ZeRO state plus per-rank training state, EMA and config, made trustworthy.

A tag directory is trusted only once `complete.json` (written last, atomically, after every rank saved) lists
each file with its size and sha256; auto-resume skips tags that fail that check (with a warning), so a killed
save or a truncated or corrupted file never poisons a resume.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from .. import dist, io
from ..config import Config, resume_changes, save_config
from ..errors import ConfigError, InputError
from ..io import sha256_file
from ..model.align import denoiser_state
from ..model.export import (check_export_matches, export, find_export, list_exports, load_export_state,
                            read_export_config)
from .engine import consolidated_fp32_state, unsafe_file
from .state import TrainState, rng_state

TAG_PREFIX = "step_"
MANIFEST = "complete.json"
EMA_FILE = "ema.safetensors"


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


def latest_good_tag(ckpt_dir: Path, warn=print, verify_loads=None) -> str | None:
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
    tags = [d for d in (run_dir / "checkpoints").glob(f"{TAG_PREFIX}*") if d.is_dir()]
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


# ---------------------------------------------------------------- saving


def save_checkpoint(cfg: Config, engine, ema, state: TrainState, loader, say=print) -> None:
    """Collective. DeepSpeed partitions + per-rank state on every rank; EMA, config, export and manifest on rank 0.
    A failed write (disk full, quota) removes the partial tag on the rank that saw it and raises StorageError;
    earlier tags are untouched, and pruning only runs after a complete save."""
    ckpt_dir, tag = cfg.run_dir / "checkpoints", tag_for(state.step)
    tag_dir = ckpt_dir / tag
    with io.storage_guard(tag_dir, "checkpoint", cleanup=tag_dir if dist.is_main() else None):
        engine.save(ckpt_dir, tag)
        save_rank_state(tag_dir, dist.rank(), {"train": dataclasses.asdict(state), "data": loader.state_dict(),
                                               "rng": rng_state()})
        if dist.is_main():
            io.atomic_save_safetensors(ema.state_dict(), tag_dir / EMA_FILE)
            save_config(cfg, tag_dir / "config.yaml")  # what this tag was trained with: resume compares to it
            meta = {"step": state.step, "images_seen": state.images_seen,
                    "device_hours": round(state.device_hours, 6), "run": cfg.run.name, "lineage": lineage(cfg)}
            export(cfg.run_dir / "export" / tag, ema, cfg.model, meta)
        dist.barrier()
        if dist.is_main():
            write_manifest(tag_dir, {"step": state.step, "world_size": dist.world_size()})
    if dist.is_main():
        prune(ckpt_dir, cfg.train.keep_last)
        for old in list_exports(cfg.run_dir)[: -cfg.train.keep_last]:
            io.remove(old)
        say(f"[checkpoint] saved {tag_dir}")
    dist.barrier()


def lineage(cfg: Config) -> dict:
    """Where this run's weights and data came from; once init_from resolved a checkpoint (lineage.json), that
    record, so that every export names the exact checkpoint folder and step it started from."""
    recorded = cfg.run_dir / "lineage.json"
    if recorded.is_file():
        return json.loads(recorded.read_text())
    return {"init_from": cfg.train.init_from or None, "data": {"source": cfg.data.source, "path": cfg.data.path,
            "classes": list(cfg.data.classes), "fraction": cfg.data.fraction}}


# ---------------------------------------------------------------- where a run starts


def choose_start(cfg: Config) -> str | None:
    """Rank 0, before anything in the run directory is written: the tag to resume from (None: a fresh start).
    Never starts over silently: checkpoints that exist but are all unusable stop the run with the list;
    train.resume=never moves them (and the old exports and logs) to archive/<time>/ first. The resumed tag's
    config must agree with this one on the keys that a resume must not change (config.FROZEN_ON_RESUME)."""
    ckpt_dir = cfg.run_dir / "checkpoints"
    for path in clean_stale_temporaries(cfg.run_dir):
        print(f"[checkpoint] removed {path}, left by a killed write", flush=True)
    if cfg.train.resume == "never":
        archived = archive_previous(cfg.run_dir)
        if archived:
            print(f"[resume] train.resume=never: the previous attempt moved to {archived}", flush=True)
        return None
    scanned = scan_tags(ckpt_dir, verify_loads=unsafe_file)
    for tag, problem in scanned:
        if problem:
            print(f"[checkpoint] skipping {ckpt_dir / tag}: {problem}", flush=True)
    good = next((tag for tag, problem in scanned if problem is None), None)
    if scanned and good is None:
        listing = "; ".join(f"{tag}: {problem}" for tag, problem in scanned)
        raise ConfigError(f"{ckpt_dir} holds checkpoints but none is usable ({listing}). Nothing was changed. "
                          f"To start over anyway, pass train.resume=never (they are kept in archive/)")
    if good:
        check_resume_config(cfg, ckpt_dir / good)
    return good


def check_resume_config(cfg: Config, tag_dir: Path) -> None:
    """Refuse, with a diff, a resume that changes what the checkpoint learned (model, data, seed, loss, batch);
    log what else changed. Tags saved before configs were stored in them are compared with config.yaml."""
    saved_file = next((f for f in (tag_dir / "config.yaml", cfg.run_dir / "config.yaml") if f.is_file()), None)
    if saved_file is None:
        return
    refused, allowed = resume_changes(yaml.safe_load(saved_file.read_text()) or {}, cfg)
    if refused:
        raise ConfigError(f"resuming {tag_dir} with a config that changes what it was trained on: "
                          f"{'; '.join(refused)}. Use another run.name for a new run, or list the keys in "
                          f"train.allow_config_change=[...] if you mean it")
    for line in allowed:
        overridden = any(line.startswith(k) for k in cfg.train.allow_config_change)
        print(f"[resume] {'warning: train.allow_config_change lets ' if overridden else 'config changed: '}{line}",
              flush=True)


def archive_previous(run_dir: Path) -> Path | None:
    """Move an earlier attempt's checkpoints, exports, logs and samples to archive/<UTC time>/ (nothing deleted)."""
    names = ["checkpoints", "export", "stats.jsonl", "tb", "lineage.json", "samples.npz", "samples.png",
             "samples.json"]
    present = [run_dir / n for n in names if (run_dir / n).exists()]
    if not present:
        return None
    dest = run_dir / "archive" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest.mkdir(parents=True, exist_ok=False)
    for path in present:
        os.replace(path, dest / path.name)
    return dest


def init_from(path: Path, net, ema, state: TrainState, reset_ema: bool, say=print, model_cfg=None) -> dict:
    """Start from another run: weights, EMA and step count; the optimizer starts fresh (docs/method.md §4).
    An export folder is checked against its config.json and, given the run's `model_cfg`, against that."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        tag = latest_good_tag(path / "checkpoints", warn=say, verify_loads=unsafe_file)
        if tag is None:
            raise ConfigError(f"train.init_from: {path}/checkpoints has no usable checkpoint")
        path = path / "checkpoints" / tag  # latest_good_tag has verified it
    elif (path / MANIFEST).is_file():
        problem = check_tag(path, verify_hashes=True, verify_loads=unsafe_file)
        if problem:
            raise ConfigError(f"train.init_from: {path} is not a usable checkpoint: {problem}")
    if (path / MANIFEST).is_file():
        weights = denoiser_state(consolidated_fp32_state(path))  # an aligned run's projector is not carried over
        ema_weights = load_file(str(path / EMA_FILE))
        prior = load_rank_state(path, 0)["train"]
    else:
        try:
            folder = find_export(path)
            prior = read_export_config(folder)
            if model_cfg is not None:
                check_export_matches(folder, prior, dataclasses.asdict(model_cfg))
            weights = ema_weights = load_export_state(folder, prior)
        except (InputError, FileNotFoundError) as err:
            raise ConfigError(f"train.init_from: {err}") from None
    net.load_state_dict(weights)
    ema.load_state_dict(weights if reset_ema else ema_weights)
    # the lineage's cost continues: quality against device-hours counts the run it started from
    state.step, state.images_seen = int(prior.get("step", 0)), int(prior.get("images_seen", 0))
    state.device_hours = float(prior.get("device_hours", 0.0))
    return {"checkpoint": str(path), "step": state.step, "ema": "reset" if reset_ema else "continued"}
