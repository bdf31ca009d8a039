"""Before step 1: resolve `auto`, validate, say what will run (--dry-run stops here), take the run directory,
decide where to start and write the run config. Every error here happens before any heavy work."""
from __future__ import annotations

import json
import os

import torch
import yaml

from .. import dist, io
from ..config import Config, aligns, grad_accum, resolve_auto, save_config, stage_config, stages_of, validate
from ..errors import ConfigError, RunDirBusy
from ..hardware import half_precision_warning
from ..model import build_denoiser, get_size, kept_tokens, token_grid, train_flops
from .checkpoint import choose_start
from .engine import build_ds_config
from .lifecycle import RunLock


def stage_configs(cfg: Config) -> list[Config]:
    """The run config as each stage trains it (its overrides applied)."""
    return [stage_config(cfg, s) for s in stages_of(cfg)] if cfg.train.stages else [cfg]


def describe(cfg: Config, world: int) -> str:
    """What --dry-run prints: config, final DeepSpeed config per stage, parameter count, FLOPs per image."""
    with torch.device("meta"):
        net = build_denoiser(cfg.model)
    m = net.model
    params = sum(p.numel() for p in net.parameters())
    tables = m.pos_embed.table.numel() + m.decoder_pos_embed.table.numel()
    lines = [f"run dir: {cfg.run_dir}", f"world size: {world}", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip()]
    for i, (stage, scfg) in enumerate(zip(stages_of(cfg), stage_configs(cfg))):
        kept = kept_tokens(scfg.mask.strategy, token_grid(scfg.model), scfg.mask.ratio)
        flops = train_flops(get_size(scfg.model.name), scfg.model.input_size, scfg.model.in_channels, kept)
        lines.append(f"stage {i} ({stage.name}): {stage.steps} steps, {scfg.engine.precision}, mask ratio "
                     f"{scfg.mask.ratio} ({scfg.mask.strategy}, {kept} tokens kept), lr {scfg.optim.lr}, "
                     f"grad accum {grad_accum(scfg, world)}, training GFLOPs per image {flops / 1e9:.2f}")
        if aligns(cfg):
            loss = scfg.loss
            until = f", until step {loss.align_until_step}" if loss.align_until_step else ""
            lines.append(f"  alignment: weight {loss.align_weight}{until}; encoder block {loss.align_depth} -> "
                         f"projector (width {loss.align_proj_dim}) -> {loss.align_teacher} features at "
                         f"{loss.align_teacher_resolution} px" if loss.align_weight else "  alignment: off")
        lines.append("ds_config: " + json.dumps(build_ds_config(scfg, world)))
    lines.append(f"parameters: {params:,} trainable + {tables:,} in fixed position tables = {params + tables:,}")
    return "\n".join(lines)


def dry_run(cfg: Config, world: int, device_memory: str | None = None) -> int:
    """Validate and print the config, the final DeepSpeed configs and the memory plan per device (against
    device_memory, e.g. "80GB", or this machine's GPU); start nothing."""
    from .memory_plan import describe_plan, local_device_memory, parse_memory

    cfg, notes = resolve_auto(cfg)
    warnings = validate(cfg, world, check_paths=False)
    try:
        memory = parse_memory(device_memory) if device_memory else local_device_memory()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print(describe(cfg, world), flush=True)
    print(describe_plan(cfg, world, memory)[0], flush=True)
    for note in notes:
        print(f"precision: {note}", flush=True)
    for warning in warnings:
        print(f"warning: {warning}", flush=True)
    return 0


def prepare(cfg: Config, world: int) -> Config:
    """Resolve `auto`, validate, and say what will run."""
    cfg, notes = resolve_auto(cfg)
    for note in notes:
        dist.print0(f"[precision] {note}")
    if dist.is_main():
        for precision in sorted({c.engine.precision for c in stage_configs(cfg)}):
            warning = half_precision_warning(precision)
            if warning:
                dist.print0(f"warning: {warning}")
    for warning in validate(cfg, world):
        dist.print0(f"warning: {warning}")
    return cfg


def lock_run_dir(cfg: Config) -> RunLock:
    """Collective: rank 0 takes <run_dir>/run.lock; every rank raises RunDirBusy if another run holds it."""
    lock, error = RunLock(cfg.run_dir, say=dist.print0), None
    if dist.is_main():
        try:
            lock.acquire()
        except RunDirBusy as err:
            error = str(err)
    error = dist.broadcast_from_main(error)
    if error:
        raise RunDirBusy(error)
    return lock


def write_run_config(cfg: Config, world: int) -> None:
    """Rank 0, after the resume check: config.yaml (the previous one kept as config.prev.yaml when it differs)
    and the final DeepSpeed configs."""
    path = cfg.run_dir / "config.yaml"
    if path.is_file() and (yaml.safe_load(path.read_text()) or {}) != cfg.to_dict():
        os.replace(path, cfg.run_dir / "config.prev.yaml")
    save_config(cfg, path)
    ds_configs = [build_ds_config(c, world) for c in stage_configs(cfg)]
    io.atomic_write_text(cfg.run_dir / "ds_config.json", json.dumps(ds_configs[0] if len(ds_configs) == 1
                                                                    else ds_configs, indent=2))


def decide_start(cfg: Config, world: int) -> str | None:
    """Collective: rank 0 chooses the tag to resume (checkpoint.choose_start) and writes the run config; every
    rank gets the tag, or the same error."""
    tag, error = None, None
    if dist.is_main():
        try:
            tag = choose_start(cfg)
            write_run_config(cfg, world)
        except ConfigError as err:
            error = str(err)
    tag, error = dist.broadcast_from_main((tag, error))
    if error:
        raise ConfigError(error)
    return tag
