"""Before step 1: resolve `auto`, validate, expand the stages, say what will run (--dry-run stops here) and take
the run directory. Every error here happens before any heavy work."""
from __future__ import annotations

import json

import torch
import yaml

from .. import dist
from ..config import Config, Stage, aligns, expand_stages, grad_accum, resolve_auto, validate
from ..errors import ConfigError, RunDirBusy
from ..hardware import describe_mode, half_precision_warning
from ..model import build_denoiser, get_size, kept_tokens, position_tables, token_grid, train_flops
from .engine import build_ds_config
from .lifecycle import RunLock


def describe(cfg: Config, world: int) -> str:
    """What --dry-run prints: config, final DeepSpeed config per stage, parameter count, FLOPs per image."""
    stages = expand_stages(cfg)
    with torch.device("meta"):
        net = build_denoiser(cfg.model)
    params = sum(p.numel() for p in net.parameters())
    tables = sum(table.numel() for table in position_tables(net))
    lines = [f"run dir: {cfg.run_dir}", f"world size: {world}", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip()]
    aligned = aligns(stages)
    for stage in stages:
        scfg = stage.cfg
        kept = kept_tokens(scfg.mask.strategy, token_grid(scfg.model), scfg.mask.ratio)
        flops = train_flops(get_size(scfg.model.name), scfg.model.input_size, scfg.model.in_channels, kept)
        lines.append(f"stage {stage.index} ({stage.name}): {stage.steps} steps, {scfg.engine.precision}, mask ratio "
                     f"{scfg.mask.ratio} ({scfg.mask.strategy}, {kept} tokens kept), lr {scfg.optim.lr}, "
                     f"grad accum {grad_accum(scfg, world)}, training GFLOPs per image {flops / 1e9:.2f}")
        if aligned:
            loss = scfg.loss
            until = f", until step {loss.align_until_step}" if loss.align_until_step else ""
            lines.append(f"  alignment: weight {loss.align_weight}{until}; encoder block {loss.align_depth} -> "
                         f"projector (width {loss.align_proj_dim}) -> {loss.align_teacher} features at "
                         f"{loss.align_teacher_resolution} px" if loss.align_weight else "  alignment: off")
        lines.append(f"  precision {describe_mode(scfg.engine.precision)}")
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


def prepare(cfg: Config, world: int) -> tuple[Config, tuple[Stage, ...]]:
    """Resolve `auto`, validate (every stage's ds_config included), and say what will run; the run config as it
    will train, and its stages. Nothing is written before this has passed."""
    cfg, notes = resolve_auto(cfg)
    for note in notes:
        dist.say(f"[precision] {note}")
    warnings = validate(cfg, world)
    stages = expand_stages(cfg)
    if dist.is_main():
        for precision in sorted({stage.cfg.engine.precision for stage in stages}):
            warning = half_precision_warning(precision)
            if warning:
                dist.say(f"warning: {warning}")
    for warning in warnings:
        dist.say(f"warning: {warning}")
    for stage in stages:
        build_ds_config(stage.cfg, world)  # refuses a ds_config JSON that sets run-config keys
    return cfg, stages


def lock_run_dir(cfg: Config) -> RunLock:
    """Collective: rank 0 takes <run_dir>/run.lock; every rank raises RunDirBusy if another run holds it."""
    lock, error = RunLock(cfg.run_dir), None
    if dist.is_main():
        try:
            lock.acquire()
        except RunDirBusy as err:
            error = str(err)
    error = dist.broadcast_from_main(error)
    if error:
        raise RunDirBusy(error)
    return lock
