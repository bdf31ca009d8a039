"""One training function for MaskDiT's masked phase and unmasked tuning (SPEC section 4), in stages.

Data flows one way: config -> data -> model -> loss -> engine -> checkpoints/logging. Every rank runs this.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from . import checkpoint as ckpt
from . import dist
from .config import (Config, grad_accum, resolve_auto, resume_changes, save_config, stage_config, stages_of,
                     validate)
from .data import DigitsJudge, ResumableLoader, build_dataset, to_model_input
from .engine import Engine, build_ds_config, consolidated_fp32_state, init_distributed, unsafe_file
from .errors import EXIT_PREEMPTED, ConfigError, RunDirBusy, TrainingError
from .generate import autocast, decode, load_decoder, run_generate_config, sample_images
from .hardware import device_peak_tflops, half_precision_warning
from .lifecycle import RunLock, StopRequest
from .loss import MaskedEDMLoss
from .metrics import RunLogger, Throughput
from .model import build_denoiser, gemm_shapes, get_size, train_flops
from .model.masking import make_mask
from .reshard import resume_source
from .sample import SamplerConfig, class_grid, generate, image_grid, to_uint8
from .schedules import ema_update, mask_ratio_at


@dataclasses.dataclass
class TrainState:
    step: int = 0  # optimizer steps over the whole lineage (continues across stages and init_from)
    stage: int = 0  # index into the stage list
    stage_step: int = 0  # optimizer steps done in the current stage
    images_seen: int = 0


# ---------------------------------------------------------------- state that must survive a resume


def rng_state() -> dict:
    """Every RNG as tensors, ints and tuples only, so that train_state files load with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def save_checkpoint(engine, ema, state, loader, cfg: Config, logger) -> None:
    """Collective. DeepSpeed partitions + per-rank state on every rank; EMA, config, export and manifest on rank 0.
    A failed write (disk full, quota) removes the partial tag on the rank that saw it and raises StorageError;
    earlier tags are untouched, and pruning only runs after a complete save."""
    ckpt_dir, tag = cfg.run_dir / "checkpoints", ckpt.tag_for(state.step)
    tag_dir = ckpt_dir / tag
    with ckpt.storage_guard(tag_dir, "checkpoint", cleanup=tag_dir if dist.is_main() else None):
        engine.save(ckpt_dir, tag)
        ckpt.save_rank_state(tag_dir, dist.rank(), {"train": dataclasses.asdict(state),
                                                    "data": loader.state_dict(), "rng": rng_state()})
        if dist.is_main():
            ckpt.atomic_save_safetensors(ema.state_dict(), tag_dir / "ema.safetensors")
            save_config(cfg, tag_dir / "config.yaml")  # what this tag was trained with: resume compares to it
            meta = {"step": state.step, "images_seen": state.images_seen, "run": cfg.run.name,
                    "lineage": lineage(cfg)}
            ckpt.export(cfg.run_dir / "export" / tag, ema, cfg.model, meta)
        dist.barrier()
        if dist.is_main():
            ckpt.write_manifest(tag_dir, {"step": state.step, "world_size": dist.world_size()})
    if dist.is_main():
        ckpt.prune(ckpt_dir, cfg.train.keep_last)
        for old in ckpt.list_exports(cfg.run_dir)[: -cfg.train.keep_last]:
            ckpt.remove(old)
        logger.message(f"[checkpoint] saved {tag_dir}")
    dist.barrier()


def lineage(cfg: Config) -> dict:
    """Where this run's weights and data came from; once init_from resolved a checkpoint (lineage.json), that
    record, so that every export names the exact checkpoint folder and step it started from."""
    recorded = cfg.run_dir / "lineage.json"
    if recorded.is_file():
        return json.loads(recorded.read_text())
    return {"init_from": cfg.train.init_from or None, "data": {"source": cfg.data.source, "path": cfg.data.path,
            "classes": list(cfg.data.classes), "fraction": cfg.data.fraction}}


def init_from(path: Path, net, ema, state: TrainState, reset_ema: bool) -> dict:
    """Start from another run: weights, EMA and step count; the optimizer starts fresh (SPEC section 4)."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        tag = ckpt.latest_good_tag(path / "checkpoints", warn=dist.print0, verify_loads=unsafe_file)
        if tag is None:
            raise ConfigError(f"train.init_from: {path}/checkpoints has no usable checkpoint")
        path = path / "checkpoints" / tag
    if (path / ckpt.MANIFEST).is_file():
        problem = ckpt.check_tag(path, verify_hashes=True, verify_loads=unsafe_file)
        if problem:
            raise ConfigError(f"train.init_from: {path} is not a usable checkpoint: {problem}")
        weights = consolidated_fp32_state(path)
        ema_weights = load_file(str(path / "ema.safetensors"))
        prior = ckpt.load_rank_state(path, 0)["train"]
    else:
        folder = ckpt.find_export(path)
        weights = ema_weights = load_file(str(folder / ckpt.EXPORT_WEIGHTS))
        prior = {"step": ckpt.read_export_config(folder).get("step", 0), "images_seen": 0}
    net.load_state_dict(weights)
    ema.load_state_dict(weights if reset_ema else ema_weights)
    state.step, state.images_seen = int(prior["step"]), int(prior.get("images_seen", 0))
    return {"checkpoint": str(path), "step": state.step, "ema": "reset" if reset_ema else "continued"}


# ---------------------------------------------------------------- one stage


class Health:
    """Per step, [non-finite losses or gradient norm, stop requested] summed over ranks without a host sync of its
    own: each step's all-reduce starts asynchronously and is read one step later (long finished by then), or at
    once before a checkpoint or a log line, so that no checkpoint is ever written after a non-finite step.

    fp16 steps are not checked for non-finite values: dynamic loss scaling overflows (and skips) on purpose; its
    runaway is the consecutive-skip limit instead.
    """

    def __init__(self, precision: str, ckpt_dir: Path):
        self.check_finite, self.ckpt_dir = precision != "fp16", ckpt_dir
        self.pending: list[tuple[int, dist.Pending]] = []
        self.stop = False  # some rank asked to stop (seen in a step's reduced flags)

    def push(self, step: int, nonfinite: torch.Tensor, stop_requested: bool) -> None:
        """Start step `step`'s reduction; check the previous step's, which has long completed."""
        flags = torch.stack([nonfinite.float().reshape(()), torch.tensor(float(stop_requested), device=nonfinite.device)])
        self.pending.append((step, dist.all_reduce_async(flags)))
        while len(self.pending) > 1:
            self._check(*self.pending.pop(0))

    def flush(self) -> None:
        """Check every step so far (waits for the last reduction): before a checkpoint, a log line, the end."""
        while self.pending:
            self._check(*self.pending.pop(0))

    def _check(self, step: int, pending: dist.Pending) -> None:
        nonfinite, stop = pending.result().tolist()
        self.stop = self.stop or stop > 0
        if self.check_finite and nonfinite > 0:
            tags = ckpt.list_tags(self.ckpt_dir)
            last = f"the last good checkpoint is {self.ckpt_dir / tags[-1]}" if tags else "no checkpoint was written"
            raise TrainingError(f"step {step}: non-finite loss or gradient norm on some rank (the run diverged); "
                                f"nothing was saved after it, and {last}. Lower optim.lr or change precision.")


def run_stage(cfg: Config, steps: int, engine: Engine, ema, loader: ResumableLoader, state: TrainState,
              logger: RunLogger, stop: StopRequest, total_steps: int, fid_monitor=None) -> int | None:
    """Train until the stage has `steps` optimizer steps. Returns EXIT_PREEMPTED if stopped by a signal."""
    device, world = dist.device(), dist.world_size()
    size = get_size(cfg.model.name)
    loss_fn = MaskedEDMLoss(size.patch_size, cfg.model.num_classes, cfg.loss.P_mean, cfg.loss.P_std,
                            cfg.model.sigma_data, cfg.loss.mae_weight, cfg.loss.label_dropout)
    accum = grad_accum(cfg, world)
    shapes = gemm_shapes(size, cfg.model.input_size, cfg.train.micro_batch, cfg.mask.ratio)
    peak, _ = device_peak_tflops(cfg.engine.precision, cfg.engine.tf32, shapes, cfg.metrics.peak_tflops)
    meter = Throughput(lambda r: train_flops(size, cfg.model.input_size, cfg.model.in_channels, r), peak, world)
    sums, streak = defaultdict(lambda: torch.zeros((), device=device, dtype=torch.float64)), 0
    health = Health(cfg.engine.precision, cfg.run_dir / "checkpoints")
    batches = iter(loader)

    while state.stage_step < steps:
        ratio = mask_ratio_at(cfg.mask.ratio, cfg.mask.schedule, state.stage_step / steps, cfg.mask.power)
        skipped_before = engine.skipped_steps
        nonfinite = torch.zeros((), device=device)
        for _ in range(accum):  # DeepSpeed applies the optimizer on the last micro-batch
            batch = next(batches)
            x = to_model_input(batch["x"].to(device, non_blocking=True), cfg.data)
            mask = structured_mask(cfg, x.shape[0], ratio, device)
            loss, parts = loss_fn(engine, x, batch["y"].to(device, non_blocking=True), ratio, mask=mask)
            engine.backward(loss.mean())
            engine.step()
            for key, value in (("loss", loss.detach()), *parts.items()):
                sums[key] += value.double().sum()
            sums["count"] += loss.shape[0]
            nonfinite += (~torch.isfinite(loss.detach())).sum()
        grad_bad = engine.grad_norm_finite()
        health.push(state.step + 1, nonfinite if grad_bad is None else nonfinite + grad_bad, stop.requested)
        state.step, state.stage_step = state.step + 1, state.stage_step + 1
        state.images_seen += cfg.train.global_batch
        meter.add(cfg.train.global_batch, ratio)
        if engine.skipped_steps > skipped_before:  # fp16 overflow: weights unchanged, scale halved
            streak += 1
        else:
            streak = 0
            ema_update(ema, engine.module, cfg.train.ema_decay)
        if streak >= cfg.train.max_skipped_streak:
            raise TrainingError(f"step {state.step}: {streak} consecutive fp16 steps overflowed (loss scale "
                                f"{engine.loss_scale:g}); the run diverged. Lower optim.lr or use bf16/fp32.")

        last = state.stage_step == steps
        checkpoint_due = state.step % cfg.train.ckpt_every == 0 or last
        if state.step % cfg.train.log_every == 0 or last:
            health.flush()
            log_window(cfg, engine, state, sums, ratio, meter, logger, loader)
            sums.clear()
        if cfg.train.grid_every and state.step % cfg.train.grid_every == 0:
            log_grid(cfg, ema, logger, state.step)
        if fid_monitor is not None and fid_monitor.due(state.step):  # collective: every rank samples its share
            logger.scalars(state.step, {"fid": fid_monitor(state.step, ema)})
        if checkpoint_due or health.stop:
            health.flush()  # never save after a non-finite step; and every rank agrees on stopping here
            save_checkpoint(engine, ema, state, loader, cfg, logger)
        logger.advance()
        if health.stop:
            reasons = [r for r in dist.all_gather_objects(stop.reason) if r]
            logger.message(f"[stop] {reasons[0] if reasons else 'stop requested'}: saved step {state.step}, "
                           f"exiting {EXIT_PREEMPTED}")
            stop.exiting()
            return EXIT_PREEMPTED
    health.flush()
    return None


def structured_mask(cfg: Config, n: int, ratio: float, device):
    """Random masks are drawn inside the model; block and crop masks are made here and passed in (N, L)."""
    if cfg.mask.strategy == "random" or ratio <= 0:
        return None
    grid = cfg.model.input_size // get_size(cfg.model.name).patch_size
    return make_mask(cfg.mask.strategy, n, grid, ratio, cfg.mask.block_size, device=device).mask


def log_window(cfg, engine, state, sums, ratio, meter, logger, loader) -> None:
    keys = ["loss", "dsm", "mae", "count"]
    values = dict(zip(keys, dist.all_reduce(torch.stack([sums[k] for k in keys])).tolist()))
    count = max(values["count"], 1)
    stats = {"loss": values["loss"] / count, "dsm": values["dsm"] / count, "mae": values["mae"] / count,
             "lr": engine.lr, "mask_ratio": ratio, "loss_scale": engine.loss_scale,
             "skipped_steps": engine.skipped_steps, "images_seen": state.images_seen, "epoch": loader.epoch,
             "stage": state.stage, **meter.read()}
    logger.scalars(state.step, stats)


@torch.no_grad()
def log_grid(cfg: Config, ema, logger: RunLogger, step: int) -> None:
    """EMA samples (one per class, cycling) with guidance, as a TensorBoard image; rank 0 only."""
    if not dist.is_main():
        return
    n, classes = cfg.sample.grid_size, cfg.model.num_classes
    sampler = SamplerConfig(steps=cfg.sample.steps, guidance=cfg.sample.guidance)
    shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    with autocast(cfg.sample.precision, dist.device()):
        images, _ = generate(ema, list(range(n)), shape, classes, sampler, dist.device(),
                             class_labels=torch.arange(n) % classes)
    if cfg.data.source == "latents":
        images = decode_latents(images, cfg)
    logger.image("samples/ema", image_grid(to_uint8(images.float())), step)


def decode_latents(latents: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Latents -> [-1, 1] images with the configured VAE; without one, show 3 latent channels rescaled."""
    if not cfg.data.vae:
        x = latents[:, :3].float()
        return (x / x.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)).clamp(-1, 1)
    images, _ = decode(grid_vae(cfg.data.vae), latents.float(), cfg.data.latent_scale, batch=len(latents))
    return images


def grid_vae(spec: str):
    """The run's VAE for sample grids (load_decoder caches it, so FID and final samples share it)."""
    return load_decoder(spec, dist.device())[0]


# ---------------------------------------------------------------- after training


@torch.no_grad()
def final_samples(cfg: Config, ema, logger: RunLogger) -> None:
    """Sample cfg.sample.final_samples images with the EMA and guidance, split over ranks by seed, into
    samples.npz (arr_0 uint8 NHWC, arr_1 labels) and samples.png; the digits example is also judged."""
    n = cfg.sample.final_samples
    if n <= 0 or (cfg.data.source == "latents" and not cfg.data.vae):
        return
    seeds = list(range(n))[dist.rank() :: dist.world_size()]
    shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    gcfg = run_generate_config(cfg, batch_size=128)
    vae = load_decoder(gcfg.vae, dist.device())[0]
    pixels, labels = sample_images(ema, seeds, None, shape, gcfg, dist.device(), vae, progress=dist.is_main())
    parts = dist.gather_to_main((seeds, pixels, labels))  # pixels go to rank 0 only
    if not dist.is_main():
        return
    order = np.argsort(np.concatenate([p[0] for p in parts]))
    pixels = np.concatenate([p[1] for p in parts])[order]
    classes = np.concatenate([p[2] for p in parts])[order]
    np.savez(cfg.run_dir / "samples.npz", arr_0=pixels, arr_1=classes)
    from PIL import Image

    Image.fromarray(class_grid(pixels, classes)).save(cfg.run_dir / "samples.png")
    report = {"num_samples": int(n), "guidance": cfg.sample.guidance, "steps": cfg.sample.steps}
    if cfg.data.source == "digits":
        as_float = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
        report["digits_class_agreement"] = DigitsJudge().agreement(as_float, torch.from_numpy(classes))
    ckpt.atomic_write_text(cfg.run_dir / "samples.json", json.dumps(report, indent=2))
    logger.message(f"[samples] wrote {cfg.run_dir / 'samples.npz'}: {json.dumps(report)}")


# ---------------------------------------------------------------- the run


def describe(cfg: Config, world: int) -> str:
    """What --dry-run prints: config, final DeepSpeed config per stage, parameter count, FLOPs per image."""
    with torch.device("meta"):
        net = build_denoiser(cfg.model)
    m = net.model
    params = sum(p.numel() for p in net.parameters())
    tables = m.pos_embed.table.numel() + m.decoder_pos_embed.table.numel()
    size = get_size(cfg.model.name)
    lines = [f"run dir: {cfg.run_dir}", f"world size: {world}", yaml_dump(cfg.to_dict())]
    for i, stage in enumerate(stages_of(cfg)):
        scfg = stage_config(cfg, stage) if cfg.train.stages else cfg
        flops = train_flops(size, scfg.model.input_size, scfg.model.in_channels, scfg.mask.ratio)
        lines.append(f"stage {i} ({stage.name}): {stage.steps} steps, {scfg.engine.precision}, mask ratio "
                     f"{scfg.mask.ratio}, lr {scfg.optim.lr}, grad accum {grad_accum(scfg, world)}, "
                     f"training GFLOPs per image {flops / 1e9:.2f}")
        lines.append("ds_config: " + json.dumps(build_ds_config(scfg, world)))
    lines.append(f"parameters: {params:,} trainable + {tables:,} in fixed position tables = {params + tables:,}")
    return "\n".join(lines)


def yaml_dump(values: dict) -> str:
    return yaml.safe_dump(values, sort_keys=False).rstrip()


def dry_run(cfg: Config, world: int) -> int:
    """Validate, print and save the config and the final DeepSpeed configs; start nothing."""
    cfg, notes = resolve_auto(cfg)
    warnings = validate(cfg, world, check_paths=False)
    print(describe(cfg, world), flush=True)
    for note in notes:
        print(f"precision: {note}", flush=True)
    for warning in warnings:
        print(f"warning: {warning}", flush=True)
    return 0


def prepare(cfg: Config, world: int) -> tuple[Config, list]:
    """Resolve `auto`, validate, and say what will run. Every error here happens before any heavy work."""
    cfg, notes = resolve_auto(cfg)
    for note in notes:
        dist.print0(f"[precision] {note}")
    stage_cfgs = [stage_config(cfg, s) for s in stages_of(cfg)] if cfg.train.stages else [cfg]
    if dist.is_main():
        for precision in sorted({c.engine.precision for c in stage_cfgs}):
            warning = half_precision_warning(precision)
            if warning:
                dist.print0(f"warning: {warning}")
    for warning in validate(cfg, world):
        dist.print0(f"warning: {warning}")
    return cfg, stage_cfgs


def lock_run_dir(cfg: Config) -> RunLock:
    """Collective: rank 0 takes <run_dir>/run.lock; every rank raises RunDirBusy if another run holds it."""
    lock, error = RunLock(cfg.run_dir, say=dist.print0), None
    if dist.is_main():
        try:
            lock.acquire()
        except RunDirBusy as err:
            error = str(err)
    error = dist.all_gather_objects(error)[0]
    if error:
        raise RunDirBusy(error)
    return lock


def train(cfg: Config) -> int:
    init_distributed()
    cfg, stage_cfgs = prepare(cfg, dist.world_size())
    lock = lock_run_dir(cfg)
    try:
        return train_locked(cfg, stage_cfgs)
    finally:
        lock.release()


# ---------------------------------------------------------------- where a run starts


def choose_start(cfg: Config) -> str | None:
    """Rank 0, before anything in the run directory is written: the tag to resume from (None: a fresh start).
    Never starts over silently: checkpoints that exist but are all unusable stop the run with the list;
    train.resume=never moves them (and the old exports and logs) to archive/<time>/ first. The resumed tag's
    config must agree with this one on the keys that a resume must not change (config.FROZEN_ON_RESUME)."""
    ckpt_dir = cfg.run_dir / "checkpoints"
    for path in ckpt.clean_stale_temporaries(cfg.run_dir):
        print(f"[checkpoint] removed {path}, left by a killed write", flush=True)
    if cfg.train.resume == "never":
        archived = archive_previous(cfg.run_dir)
        if archived:
            print(f"[resume] train.resume=never: the previous attempt moved to {archived}", flush=True)
        return None
    scanned = ckpt.scan_tags(ckpt_dir, verify_loads=unsafe_file, stop_at_good=True)
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


def write_run_config(cfg: Config, stage_cfgs: list, world: int) -> None:
    """Rank 0, after the resume check: config.yaml (the previous one kept as config.prev.yaml when it differs)
    and the final DeepSpeed configs."""
    path = cfg.run_dir / "config.yaml"
    if path.is_file() and (yaml.safe_load(path.read_text()) or {}) != cfg.to_dict():
        os.replace(path, cfg.run_dir / "config.prev.yaml")
    save_config(cfg, path)
    ds_configs = [build_ds_config(c, world) for c in stage_cfgs]
    ckpt.atomic_write_text(cfg.run_dir / "ds_config.json", json.dumps(ds_configs[0] if len(ds_configs) == 1
                                                                      else ds_configs, indent=2))


def decide_start(cfg: Config, stage_cfgs: list, world: int) -> str | None:
    """Collective: rank 0 chooses (and writes the run config); every rank gets the tag, or the same error."""
    tag, error = None, None
    if dist.is_main():
        try:
            tag = choose_start(cfg)
            write_run_config(cfg, stage_cfgs, world)
        except ConfigError as err:
            error = str(err)
    tag, error = dist.broadcast_from_main((tag, error))
    if error:
        raise ConfigError(error)
    return tag


def train_locked(cfg: Config, stage_cfgs: list) -> int:
    # 1. World, config (validated by prepare) and the starting point, checked before anything is written.
    rank, world, device = dist.rank(), dist.world_size(), dist.device()
    stages = stages_of(cfg)
    resume = decide_start(cfg, stage_cfgs, world)
    seed_everything(cfg.run.seed + rank)  # different masks, noise and label dropout per rank

    # 2. Data.
    dataset = build_dataset(cfg.data, cfg.model, cfg.run.seed)

    # 3. Model, EMA (fp32), and where we start from.
    net = build_denoiser(cfg.model)
    ema = copy.deepcopy(net).to(device).eval().requires_grad_(False)
    state = TrainState()
    resumed, ds_tag, universal, data_state = None, resume, False, None
    if resume:
        tag_dir = cfg.run_dir / "checkpoints" / resume
        # Saved on another world size: rank 0 makes <tag>/universal (DeepSpeed universal checkpoint + per-rank
        # states for this world size) once; every rank then loads from there.
        state_dir, ds_tag, universal = resume_source(tag_dir, world)
        resumed = ckpt.load_rank_state(state_dir, rank)
        state = TrainState(**resumed["train"])
        ema.load_state_dict(load_file(str(tag_dir / "ema.safetensors")))
        dist.print0(f"[resume] from {tag_dir} (step {state.step}, stage {state.stage})"
                    + (f", resharded to {world} ranks via {state_dir}" if universal else ""))
        data_state = resumed["data"]  # the data position carries across stages
        if state.stage_step >= stages[state.stage].steps:  # saved at the end of a stage: nothing left of it
            net.load_state_dict(consolidated_fp32_state(tag_dir))
            set_rng_state(resumed["rng"])
            resumed = None
            state.stage, state.stage_step = state.stage + 1, 0
            if state.stage == len(stages):
                dist.print0(f"[resume] training already finished at step {state.step}; nothing left to train")
    elif cfg.train.init_from:
        record = init_from(Path(cfg.train.init_from), net, ema, state, cfg.train.reset_ema)
        if dist.is_main():
            ckpt.atomic_write_text(cfg.run_dir / "lineage.json", json.dumps({**lineage(cfg), **record}, indent=2))
        dist.print0(f"[init] {record}")

    total = state.step - state.stage_step + sum(s.steps for s in stages[state.stage:])
    logger = RunLogger(cfg.run_dir, dist.is_main(), total_steps=total, start_step=state.step)
    try:  # the progress bar closes (ends its line) however the run ends
        stop = StopRequest(say=dist.print0)
        fid_monitor = None
        if cfg.eval.fid_every:  # fails on every rank, before training, if weights or reference are wrong
            from .fid_monitor import FIDMonitor

            fid_monitor = FIDMonitor(cfg)
        # 4. Stages: a new engine at each boundary (precision, optimizer and lr may change; the EMA continues).
        for index in range(state.stage, len(stages)):
            scfg = stage_cfgs[index]
            loader = ResumableLoader(dataset, scfg.train.micro_batch, rank, world, cfg.run.seed,
                                     num_workers=scfg.data.num_workers, pin_memory=torch.cuda.is_available())
            if data_state:
                loader.load_state_dict(data_state)
            engine = Engine(net.to(device), scfg, world, load_universal=universal and resumed is not None)
            if resumed is not None:  # only the stage we resumed in loads DeepSpeed state
                engine.load(cfg.run_dir / "checkpoints", ds_tag)
                set_rng_state(resumed["rng"])
                resumed = None
            logger.message(f"[stage {index}] {stages[index].name}: {stages[index].steps} steps, "
                           f"{scfg.engine.precision}, mask ratio {scfg.mask.ratio}, lr {scfg.optim.lr}")
            code = run_stage(scfg, stages[index].steps, engine, ema, loader, state, logger, stop, total,
                             fid_monitor)
            if code is not None:
                return code
            data_state = loader.state_dict()
            weights = engine.full_fp32_state()  # hand the fp32 masters to the next stage
            engine.release()
            with torch.random.fork_rng(devices=[]):  # its random init is overwritten; a resume at this boundary
                net = build_denoiser(cfg.model)  # skips it, so it must not move the RNG
            net.load_state_dict(weights)
            if index + 1 < len(stages):
                state.stage, state.stage_step = index + 1, 0

        # 5. Samples from the EMA.
        final_samples(cfg, ema, logger)
        stop.exiting()  # the run is complete: a late SLURM signal must not turn exit 0 into 143
        return 0
    finally:
        logger.close()
