"""Saving a tag: every rank's DeepSpeed partitions and training state, then on rank 0 the EMA, the config, an export
and complete.json, then pruning of older tags and exports."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ... import dist, io
from ...config import Config, save_config
from ...model.export import export, step_folders, step_name
from ..state import TrainState, rng_state
from . import tags


def save_checkpoint(cfg: Config, engine, ema, state: TrainState, loader, say=dist.say) -> Path:
    """Collective. DeepSpeed partitions + per-rank state on every rank; EMA, config, export and manifest on rank 0.
    A failed write (disk full, quota) removes the partial tag on the rank that saw it and raises StorageError;
    earlier tags are untouched, and pruning only runs after a complete save. Returns the complete tag."""
    ckpt_dir, tag = cfg.run_dir / "checkpoints", step_name(state.step)
    tag_dir = ckpt_dir / tag
    with io.storage_guard(tag_dir, "checkpoint", cleanup=tag_dir if dist.is_main() else None):
        engine.save(ckpt_dir, tag)
        tags.save_rank_state(tag_dir, dist.rank(), {"train": dataclasses.asdict(state), "data": loader.state_dict(),
                                                    "rng": rng_state()})
        if dist.is_main():
            tags.save_ema(ema, tag_dir)
            save_config(cfg, tag_dir / "config.yaml")  # what this tag was trained with: resume compares to it
            meta = {"step": state.step, "images_seen": state.images_seen,
                    "device_hours": round(state.device_hours, 6), "run": cfg.run.name, "lineage": lineage(cfg)}
            export(cfg.run_dir / "export" / tag, ema, cfg.model, meta)
        dist.barrier()
        if dist.is_main():
            tags.write_manifest(tag_dir, {"step": state.step, "world_size": dist.world_size()})
    if dist.is_main():
        tags.prune(ckpt_dir, cfg.train.keep_last)
        for old in step_folders(cfg.run_dir / "export")[: -cfg.train.keep_last]:
            io.remove(old)
        say(f"[checkpoint] saved {tag_dir}")
    dist.barrier()
    return tag_dir


def lineage(cfg: Config) -> dict:
    """Where this run's weights and data came from; once init_from resolved a checkpoint (lineage.json), that
    record, so that every export names the exact checkpoint folder and step it started from."""
    recorded = cfg.run_dir / "lineage.json"
    if recorded.is_file():
        return json.loads(recorded.read_text())
    return {"init_from": cfg.train.init_from or None, "data": {"source": cfg.data.source, "path": cfg.data.path,
            "classes": list(cfg.data.classes), "fraction": cfg.data.fraction}}


def write_lineage(cfg: Config, record: dict) -> None:
    """Rank 0, when train.init_from resolved its checkpoint: lineage.json names that folder and its step."""
    io.atomic_write_text(cfg.run_dir / "lineage.json", json.dumps({**lineage(cfg), **record}, indent=2))
