"""Where a run starts, and with what: one decision, made once, that the training loop logs.

  fresh      no usable tag of this run and no train.init_from
  resume     the newest usable tag of this run: EMA, counters, data position, RNG and DeepSpeed state (a tag saved
             on another world size is resharded once into <tag>/universal; a tag saved at the end of a stage
             starts the next stage from its fp32 masters with a new engine, as an uninterrupted run hands over)
  init_from  another run's checkpoint or export: weights, EMA and counters; a new optimizer (docs/method.md §4)

decide_start() runs before the model exists and before anything in the run directory is written; restore() puts
the starting weights into the built modules; load_engine_state() gives the first engine the tag's DeepSpeed state.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ... import dist, io
from ...config import Config, Stage, resume_changes, save_config
from ...errors import ConfigError, InputError
from ...model.align import denoiser_of, denoiser_state
from ...model.export import check_export_matches, find_export, load_export_state, read_export_config
from ..engine import build_ds_config, consolidated_fp32_state, unsafe_file
from ..state import TrainState, set_rng_state
from .reshard import resume_source
from .save import write_lineage
from .tags import (MANIFEST, check_tag, clean_stale_temporaries, latest_good_tag, load_ema, load_rank_state,
                   scan_tags)


@dataclass
class Start:
    """The answer of decide_start: where this rank continues from (the same decision on every rank)."""

    kind: str  # fresh | resume | init_from
    state: TrainState = field(default_factory=TrainState)  # the counters the run continues from
    source: Path | None = None  # the tag resumed, or the checkpoint tag / export init_from reads
    data_state: dict | None = None  # resume: this rank's loader position
    rng: dict | None = None  # resume: this rank's RNG state, set once the model is built (it draws its init)
    engine_tag: str | None = None  # resume: DeepSpeed tag (relative to checkpoints/) the first engine loads, once
    universal: bool = False  # engine_tag is a universal checkpoint: the tag was saved on another world size
    world_size: int = 1
    stage_done: bool = False  # resume: the tag ended a stage, so the next stage starts from its fp32 masters
    finished: bool = False  # resume: the tag ended the last stage; nothing is left to train
    reset_ema: bool = False  # init_from: the EMA starts from the loaded weights, not the loaded EMA
    record: dict = field(default_factory=dict)  # init_from: what was read (also written to lineage.json)

    @property
    def loads_universal(self) -> bool:
        """Whether the first engine must be created for a universal checkpoint (DeepSpeed decides at init)."""
        return self.universal and self.engine_tag is not None

    def describe(self) -> str:
        """The decision as log lines."""
        if self.kind == "init_from":
            return f"[init] {self.record}"
        if self.kind == "fresh":
            return "[start] fresh: no usable checkpoint of this run and no train.init_from"
        saved_stage = self.state.stage - 1 if self.stage_done else self.state.stage
        line = f"[resume] from {self.source} (step {self.state.step}, stage {saved_stage})"
        if self.universal:
            line += f", resharded to {self.world_size} ranks via {self.source / 'universal'}"
        if self.finished:
            line += f"\n[resume] training already finished at step {self.state.step}; nothing left to train"
        return line


def decide_start(cfg: Config, stages: typing.Sequence[Stage], world: int) -> Start:
    """Collective. Rank 0 picks the tag to resume (choose_tag), then writes the run config; every rank gets the
    tag, or the same error. Then each rank reads where it continues: the tag (resharded when it was saved on
    another world size), else train.init_from, else nothing."""
    tag, error = None, None
    if dist.is_main():
        try:
            tag = choose_tag(cfg)
            write_run_config(cfg, stages, world)
        except ConfigError as err:
            error = str(err)
    tag, error = dist.broadcast_from_main((tag, error))
    if error:
        raise ConfigError(error)
    if tag is not None:
        return resume_point(cfg.run_dir / "checkpoints" / tag, stages, world)
    if cfg.train.init_from:
        return init_point(cfg)
    return Start("fresh", world_size=world)


def restore(start: Start, net: torch.nn.Module, ema: torch.nn.Module) -> None:
    """The starting weights into the built modules (net: what the engine trains; ema: the denoiser's fp32 EMA).
    The DeepSpeed state of a resume waits for the first engine (load_engine_state)."""
    if start.kind == "resume":
        load_ema(ema, start.source)
        if start.stage_done:  # the next stage's engine starts from the masters; the RNG as the tag left it
            net.load_state_dict(consolidated_fp32_state(start.source))
            set_rng_state(start.rng)
    elif start.kind == "init_from":
        load_init_weights(start.source, denoiser_of(net), ema, start.reset_ema)


def load_engine_state(start: Start, engine) -> None:
    """The first engine of a resume loads the tag's DeepSpeed state (optimizer, loss scale, fp32 masters) and
    this rank's RNG as saved; later engines (the next stages) start fresh, so the state is handed over once."""
    if start.engine_tag is None:
        return
    engine.load(start.source.parent, start.engine_tag)
    set_rng_state(start.rng)
    start.engine_tag, start.rng = None, None


# ---------------------------------------------------------------- resume


def choose_tag(cfg: Config) -> str | None:
    """Rank 0, before anything in the run directory is written: the tag to resume from (None: a fresh start).
    Never starts over silently: checkpoints that exist but are all unusable stop the run with the list;
    train.resume=never moves them (and the old exports and logs) to archive/<time>/ first. The resumed tag's
    config must agree with this one on the keys that a resume must not change (config.FROZEN_ON_RESUME)."""
    ckpt_dir = cfg.run_dir / "checkpoints"
    for path in clean_stale_temporaries(cfg.run_dir):
        dist.say(f"[checkpoint] removed {path}, left by a killed write")
    if cfg.train.resume == "never":
        archived = archive_previous(cfg.run_dir)
        if archived:
            dist.say(f"[resume] train.resume=never: the previous attempt moved to {archived}")
        return None
    scanned = scan_tags(ckpt_dir, verify_loads=unsafe_file)
    for tag, problem in scanned:
        if problem:
            dist.say(f"[checkpoint] skipping {ckpt_dir / tag}: {problem}")
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
        dist.say(f"[resume] {'warning: train.allow_config_change lets ' if overridden else 'config changed: '}"
                    f"{line}")


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


def write_run_config(cfg: Config, stages: typing.Sequence[Stage], world: int) -> None:
    """Rank 0, after the resume check: config.yaml (the previous one kept as config.prev.yaml when it differs)
    and the final DeepSpeed configs."""
    ds_configs = [build_ds_config(stage.cfg, world) for stage in stages]  # may refuse: before any write
    path = cfg.run_dir / "config.yaml"
    if path.is_file() and (yaml.safe_load(path.read_text()) or {}) != cfg.to_dict():
        os.replace(path, cfg.run_dir / "config.prev.yaml")
    save_config(cfg, path)
    io.atomic_write_text(cfg.run_dir / "ds_config.json", json.dumps(ds_configs[0] if len(ds_configs) == 1
                                                                    else ds_configs, indent=2))


def resume_point(tag_dir: Path, stages: typing.Sequence[Stage], world: int) -> Start:
    """Collective (a reshard runs on rank 0 while the others wait): this rank's counters, data position and RNG
    from the tag, and the DeepSpeed tag its first engine loads."""
    state_dir, engine_tag, universal = resume_source(tag_dir, world)
    saved = load_rank_state(state_dir, dist.rank())
    start = Start("resume", TrainState(**saved["train"]), source=tag_dir, data_state=saved["data"], rng=saved["rng"],
                  engine_tag=engine_tag, universal=universal, world_size=world)
    state = start.state
    if state.stage_step >= stages[state.stage].steps:
        start.stage_done, start.engine_tag = True, None
        state.stage, state.stage_step = state.stage + 1, 0
        start.finished = state.stage == len(stages)
    return start


# ---------------------------------------------------------------- init_from


def init_point(cfg: Config) -> Start:
    """train.init_from (a run directory, a checkpoint tag or an export folder), checked and resolved to the folder
    the weights come from; the lineage's counters continue (quality against device-hours counts the run it
    started from). Rank 0 records it in lineage.json."""
    source = init_source(Path(cfg.train.init_from))
    prior = load_rank_state(source, 0)["train"] if (source / MANIFEST).is_file() else export_record(source, cfg)
    state = TrainState(step=int(prior.get("step", 0)), images_seen=int(prior.get("images_seen", 0)),
                       device_hours=float(prior.get("device_hours", 0.0)))
    record = {"checkpoint": str(source), "step": state.step, "ema": "reset" if cfg.train.reset_ema else "continued"}
    if dist.is_main():
        write_lineage(cfg, record)
    return Start("init_from", state, source=source, reset_ema=cfg.train.reset_ema, record=record)


def init_source(path: Path) -> Path:
    """A run directory -> its newest usable tag; a tag -> itself once it passes every check; otherwise the path
    as given (an export folder, or a run directory with exports only)."""
    if (path / "checkpoints").is_dir():
        tag = latest_good_tag(path / "checkpoints", warn=dist.say, verify_loads=unsafe_file)
        if tag is None:
            raise ConfigError(f"train.init_from: {path}/checkpoints has no usable checkpoint")
        return path / "checkpoints" / tag  # latest_good_tag has verified it
    if (path / MANIFEST).is_file():
        problem = check_tag(path, verify_hashes=True, verify_loads=unsafe_file)
        if problem:
            raise ConfigError(f"train.init_from: {path} is not a usable checkpoint: {problem}")
    return path


def export_record(source: Path, cfg: Config) -> dict:
    """An export folder's config.json (or a run directory's newest), checked, and checked to hold the run's model."""
    try:
        folder = find_export(source)
        record = read_export_config(folder)
        check_export_matches(folder, record, dataclasses.asdict(cfg.model))
    except (InputError, FileNotFoundError) as err:
        raise ConfigError(f"train.init_from: {err}") from None
    return record


def load_init_weights(source: Path, denoiser: torch.nn.Module, ema: torch.nn.Module, reset_ema: bool) -> None:
    """A checkpoint tag's fp32 masters (an aligned run's projector is not carried over) and EMA, or an export's
    weights for both."""
    if (source / MANIFEST).is_file():
        weights = denoiser_state(consolidated_fp32_state(source))
        denoiser.load_state_dict(weights)
        if reset_ema:
            ema.load_state_dict(weights)
        else:
            load_ema(ema, source)
        return
    folder = find_export(source)
    try:
        weights = load_export_state(folder, read_export_config(folder))  # every key and shape checked
    except InputError as err:
        raise ConfigError(f"train.init_from: {err}") from None
    denoiser.load_state_dict(weights)
    ema.load_state_dict(weights)
