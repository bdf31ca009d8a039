"""The training run, top to bottom: MaskDiT's masked phase and unmasked tuning (docs/method.md §4) in stages.

Every rank runs train(cfg):
  1. the plan: auto precision, validation, the stages, the run-directory lock                   (plan.py)
  2. where to start, with what: fresh, a resume, or train.init_from; config.yaml                 (checkpoint/)
  3. the data                                                                                     (data/)
  4. the model (with REPA's projector when the run aligns, and the frozen teacher), its fp32 EMA, and the
     starting weights in them                                                                     (checkpoint/)
  5. the stages: a new DeepSpeed engine at each boundary (precision, optimizer and lr may change; EMA, step
     count and data position continue), each driving the step loop run_stage()
  6. samples from the EMA                                                                         (previews.py)
"""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import dist
from ..config import Config, DataConfig, LossConfig, ModelConfig, Stage, aligns, grad_accum
from ..data import ResumableLoader, build_dataset, teacher_input, to_model_input
from ..diffusion import MaskedEDMLoss, mask_ratio_at
from ..errors import EXIT_PREEMPTED, TrainingError
from ..hardware import DTYPES, device_peak_tflops, sampling_precision
from ..model import (Masker, build_denoiser, gemm_shapes, get_size, kept_tokens, materialise, token_grid,
                     train_flops)
from ..model.align import PREFIX as DENOISER_PREFIX
from ..model.align import AlignedDenoiser, denoiser_of
from ..model.teacher import Teacher, load_teacher
from . import checkpoint as ckpt
from .ema import MasterEMA
from .engine import Engine, LossScaleExhausted, init_distributed
from .lifecycle import StopRequest
from .plan import lock_run_dir, prepare
from .previews import AgreementMonitor, FIDMonitor, final_samples, log_grid
from .state import TrainState, seed_everything
from .stats import DeviceClock, RunLogger, Throughput


def train(cfg: Config) -> int:
    init_distributed(cfg.dist.timeout_s or None)
    cfg, stages = prepare(cfg, dist.world_size())
    dist.check_shared_dir(cfg.run_dir)  # every host must write the same run directory
    lock = lock_run_dir(cfg)
    try:
        with dist.naming_lost_peers():  # a rank or host gone mid-run: one line naming it, exit 5
            return train_locked(cfg, stages)
    finally:
        lock.release()


def train_locked(cfg: Config, stages: tuple[Stage, ...]) -> int:
    # 2. Where we start, decided (and config.yaml written) before anything else touches the run directory.
    start = ckpt.decide_start(cfg, stages, dist.world_size())
    seed_everything(cfg.run.seed + dist.rank())  # different masks, noise and label dropout per rank

    # 3. Data (with the source images beside latents when the teacher needs them).
    teacher = build_teacher(cfg) if aligns(stages) else None
    images_at = cfg.loss.align_teacher_resolution if teacher is not None else 0
    dataset = build_dataset(cfg.data, cfg.model, cfg.run.seed, images_at=images_at)

    # 4. Model, EMA (fp32, the denoiser alone), and the starting weights in them.
    net = build_module(cfg, teacher)
    ema = copy.deepcopy(denoiser_of(net)).to(dist.device()).eval().requires_grad_(False)
    ckpt.restore(start, net, ema)
    dist.say(start.describe())

    # 5. Stages.
    state, data_state = start.state, start.data_state
    total = state.step - state.stage_step + sum(s.steps for s in stages[state.stage:])
    logger = RunLogger(cfg.run_dir, dist.is_main(), total_steps=total, start_step=state.step)
    stop, active = StopRequest(), None
    try:  # however the run ends, what it opened is closed here (see the finally)
        # the FID monitor fails on every rank, before training, if its weights or reference are wrong
        run = Run(ema, state, logger, stop, build_monitors(cfg), teacher, DeviceClock(dist.world_size()),
                  last_good=start.source if start.kind == "resume" else None)
        for stage in stages[state.stage:]:
            active = build_stage(stage, dataset, net, data_state, start)
            code = run_stage(active, run)
            if code is not None:
                return code
            if stage.index + 1 == len(stages):
                active.engine.release()  # nothing to hand over after the last stage
                break
            net, data_state = hand_over(active, teacher)
            state.stage, state.stage_step = stage.index + 1, 0

        # 6. Samples from the EMA.
        final_samples(cfg, ema, logger, state)
        return 0
    finally:
        # Everything that holds the process group or a thread goes before the command leaves the group: an engine
        # left to the interpreter's shutdown kept DeepSpeed's group (and its gloo threads) alive into
        # finalization, where a rank could abort after saving ('terminate called without an active exception').
        if active is not None:
            active.engine.release()
            active.loader.close()
        stop.close()  # the run is over: a late SLURM signal must not turn its exit code into 143
        logger.close()


def build_teacher(cfg: Config) -> Teacher:
    """The frozen alignment teacher on this rank's device (half precision on GPUs), its features pooled to the
    denoiser's token grid."""
    dtype = DTYPES[sampling_precision("auto")]  # inference precision: bf16 (fp16) on GPUs, fp32 on CPUs
    teacher = load_teacher(cfg.loss.align_teacher, cfg.loss.align_teacher_resolution, token_grid(cfg.model),
                           dist.device(), dtype)
    dist.say(f"[align] teacher {cfg.loss.align_teacher}: {teacher.dim}-d patch features at "
             f"{teacher.resolution} px ({teacher.patch_grid}x{teacher.patch_grid} patches -> the "
             f"{teacher.grid}x{teacher.grid} token grid), {next(teacher.parameters()).dtype}, frozen")
    return teacher


def build_module(cfg: Config, teacher: Teacher | None, device=None) -> torch.nn.Module:
    """What the engine trains: the denoiser, plus REPA's projector when the run aligns, built on the meta device
    and initialised on `device` (default: this rank's; no CPU init of a large model, and on the CPU the weights
    of a plain build), or left on meta (device "meta") for weights that will be assigned."""
    device = dist.device() if device is None else device
    with torch.device("meta"):
        net = build_denoiser(cfg.model, device="meta")
        if teacher is not None:
            net = AlignedDenoiser(net, cfg.loss.align_depth, cfg.loss.align_proj_dim, teacher.dim)
    return net if torch.device(device).type == "meta" else materialise(net, device)


def build_monitors(cfg: Config) -> dict:
    """The in-training quality checks, by the stats key they log. The FID monitor fails on every rank, before
    training, if its weights or reference are wrong."""
    monitors = {}
    if cfg.eval.fid_every:
        monitors["fid"] = FIDMonitor(cfg)
    if cfg.eval.agreement_every:
        monitors["digits_class_agreement"] = AgreementMonitor(cfg)
    return monitors


# ---------------------------------------------------------------- one stage


@dataclass(frozen=True)
class StageRun(Stage):
    """One stage as the step loop sees it: the stage (index, name, steps, config) and the engine and loader built
    for it."""

    engine: Engine
    loader: ResumableLoader


@dataclass
class Run:
    """What continues across stages."""

    ema: torch.nn.Module
    state: TrainState
    logger: RunLogger
    stop: StopRequest
    monitors: dict  # stats key -> in-training quality check (FIDMonitor, AgreementMonitor)
    teacher: Teacher | None
    clock: DeviceClock
    last_good: Path | None = None  # the newest complete checkpoint of this run (resumed or saved), for failures


def build_stage(stage: Stage, dataset, net: torch.nn.Module, data_state: dict | None, start: ckpt.Start
                ) -> StageRun:
    """The stage's loader (at the carried data position) and engine (with a resumed tag's DeepSpeed state)."""
    cfg = stage.cfg
    loader = ResumableLoader(dataset, cfg.train.micro_batch, dist.rank(), dist.world_size(), cfg.run.seed,
                             num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available())
    if data_state:
        loader.load_state_dict(data_state)
    engine = Engine(net.to(dist.device()), cfg, dist.world_size(), load_universal=start.loads_universal)
    ckpt.load_engine_state(start, engine)  # only the stage we resumed in loads DeepSpeed state
    dist.say(f"[stage {stage.index}] {stage.name}: {stage.steps} steps, {cfg.engine.precision}, mask ratio "
             f"{cfg.mask.ratio}, lr {cfg.optim.lr}")
    return StageRun(stage.index, stage.name, stage.steps, cfg, engine, loader)


def hand_over(stage: StageRun, teacher: Teacher | None) -> tuple[torch.nn.Module, dict]:
    """The fp32 masters in a fresh network for the next stage's engine, and the data position."""
    weights = stage.engine.full_fp32_state()
    stage.engine.release()
    net = build_module(stage.cfg, teacher, "meta")  # no random init: a resume at this boundary skips it, so
    net.load_state_dict(weights, assign=True)  # it must not move the RNG
    return net, stage.loader.state_dict()


def run_stage(stage: StageRun, run: Run) -> int | None:
    """Train until the stage has its steps. Returns EXIT_PREEMPTED if stopped by a signal or the launcher."""
    cfg, state, engine = stage.cfg, run.state, stage.engine
    loss_fn = build_loss(cfg.model, cfg.loss, aligned=run.teacher is not None)
    meter = build_meter(cfg)
    health = Health(run.last_good)
    ema = MasterEMA(run.ema, engine, DENOISER_PREFIX if denoiser_of(engine.module) is not engine.module else "")
    sums, streak, batches = new_sums(), 0, iter(stage.loader)
    accum = grad_accum(cfg, dist.world_size())
    save_due = False  # a periodic checkpoint fell on an overflow-skipped step: it waits for an applied one

    while state.stage_step < stage.steps:
        ratio = mask_ratio_at(cfg.mask.ratio, cfg.mask.schedule, state.stage_step / stage.steps, cfg.mask.power)
        masker = Masker(cfg.mask.strategy, token_grid(cfg.model), ratio, cfg.mask.block_size)
        teacher = run.teacher if aligning(cfg.loss, state.step) else None
        skipped_before = engine.skipped_steps
        try:
            nonfinite = train_step(engine, batches, loss_fn, masker, teacher, cfg.data, accum, sums)
        except LossScaleExhausted as err:  # on every rank: the overflow is seen in the global gradient norm
            raise health.failure(state.step + 1, f"{err}; the run diverged") from None
        skipped = engine.skipped_steps > skipped_before  # fp16 overflow: weights unchanged, scale lowered
        health.push(state.step + 1, engine.divergence(nonfinite, skipped), run.stop.requested)
        state.step, state.stage_step = state.step + 1, state.stage_step + 1
        state.images_seen += cfg.train.global_batch
        meter.add(cfg.train.global_batch, masker.kept)
        streak = streak + 1 if skipped else 0
        if not skipped:
            ema.update(cfg.train.ema_decay)
        if streak >= cfg.train.max_skipped_streak:
            raise health.failure(state.step, f"{streak} consecutive fp16 steps overflowed (loss scale "
                                              f"{engine.loss_scale:g}); the run diverged")

        last = state.stage_step == stage.steps
        run.clock.charge(state)
        if state.step % cfg.train.log_every == 0 or last:
            health.flush()
            log_window(engine, state, sums, ratio, meter, run.logger, stage.loader.epoch)
            sums = new_sums()
        evaluate(cfg, run, ema)
        save_due = save_due or state.step % cfg.train.ckpt_every == 0
        # During an fp16 overflow storm every step is skipped and the weights may be the ones that diverged: a
        # periodic checkpoint waits for a step that trained (every rank sees the same skips), so that pruning never
        # trades a good tag for one written mid-storm. Stage ends and stop requests save regardless.
        if (save_due and not skipped) or last or health.stop:
            save_due = False
            health.flush()  # never save after a non-finite step; and every rank agrees on stopping here
            health.check_weights(state.step, engine, ema)  # nor non-finite weights or EMA
            run.clock.charge(state, agree=True)
            saved = ckpt.save_checkpoint(cfg, engine, ema.gather(), state, stage.loader)
            run.last_good = health.last_good = saved
        run.logger.advance()
        if health.stop:
            reasons = [r for r in dist.all_gather_objects(run.stop.reason) if r]
            dist.say(f"[stop] {reasons[0] if reasons else 'stop requested'}: saved step {state.step}, "
                     f"exiting {EXIT_PREEMPTED}")
            return EXIT_PREEMPTED
    health.flush()
    ema.gather()  # the full EMA network for the next stage and the final samples
    return None


def aligning(loss_cfg: LossConfig, step: int) -> bool:
    """Whether optimizer step `step` (0-based, of the whole run) has the alignment term: the stage's weight is
    positive and align_until_step, if set, is not reached."""
    return loss_cfg.align_weight > 0 and (not loss_cfg.align_until_step or step < loss_cfg.align_until_step)


def evaluate(cfg: Config, run: Run, ema: MasterEMA) -> None:
    """Sample grids and in-training quality checks that are due; their time is not charged to device-hours.
    Each quality value is logged with the device-hours and images seen that reached it."""
    step, state = run.state.step, run.state
    due = [name for name, monitor in run.monitors.items() if monitor.due(step)]
    grid = cfg.train.grid_every and step % cfg.train.grid_every == 0
    if not due and not grid:
        return
    ema.gather()  # collective: every rank evaluates (grids on rank 0, samples spread over ranks)
    if grid:
        log_grid(cfg, run.ema, run.logger, step)
    for name in due:  # collective: every rank samples its share
        run.logger.scalars(step, {name: run.monitors[name](step, run.ema), "device_hours": state.device_hours,
                                  "images_seen": state.images_seen})
    run.clock.skip()


def build_loss(model_cfg: ModelConfig, loss_cfg: LossConfig, aligned: bool = False) -> MaskedEDMLoss:
    size = get_size(model_cfg.name)
    return MaskedEDMLoss(size.patch_size, model_cfg.num_classes, loss_cfg.P_mean, loss_cfg.P_std,
                         model_cfg.sigma_data, loss_cfg.mae_weight, loss_cfg.label_dropout, aligned,
                         loss_cfg.align_weight)


def build_meter(cfg: Config) -> Throughput:
    """Images/s, TFLOP/s and MFU of the stage: FLOPs from the kept tokens of each step's mask, against this
    device's peak for the stage's precision."""
    size, m = get_size(cfg.model.name), cfg.model
    kept = kept_tokens(cfg.mask.strategy, token_grid(m), cfg.mask.ratio)
    shapes = gemm_shapes(size, m.input_size, cfg.train.micro_batch, kept)
    peak, _ = device_peak_tflops(cfg.engine.precision, cfg.engine.tf32, shapes, cfg.metrics.peak_tflops)
    return Throughput(lambda kept_now: train_flops(size, m.input_size, m.in_channels, kept_now), peak,
                      dist.world_size())


def new_sums() -> defaultdict:
    return defaultdict(lambda: torch.zeros((), device=dist.device(), dtype=torch.float64))


def train_step(engine: Engine, batches, loss_fn: MaskedEDMLoss, masker: Masker, teacher: Teacher | None,
               data_cfg: DataConfig, accum: int, sums: dict) -> torch.Tensor:
    """One optimizer step over `accum` micro-batches; adds the per-sample loss parts to `sums` and returns the
    count of non-finite losses as a 0-dim device tensor. teacher: the frozen encoder whose features of the clean
    images the step aligns to (None: no alignment this step)."""
    device = dist.device()
    nonfinite = torch.zeros((), device=device)
    for _ in range(accum):  # DeepSpeed applies the optimizer on the last micro-batch
        batch = next(batches)
        x = to_model_input(batch["x"].to(device, non_blocking=True), data_cfg)
        target = None if teacher is None else teacher(teacher_input(batch, x).to(device, non_blocking=True))
        loss, parts = loss_fn(engine, x, batch["y"].to(device, non_blocking=True), masker, target)
        engine.backward(loss.mean())
        engine.step()
        for key, value in (("loss", loss.detach()), *parts.items()):
            sums[key] += value.double().sum()
            sums[f"{key}_count"] += value.shape[0]  # "align" is only there on the steps that align
        nonfinite += (~torch.isfinite(loss.detach())).sum()
    return nonfinite


def log_window(engine: Engine, state: TrainState, sums: dict, ratio: float, meter: Throughput, logger: RunLogger,
               epoch: int) -> None:
    """Collective: the window's mean loss parts over all ranks, with the engine's lr and loss scale, and the
    device-hours and images seen so far."""
    parts = [k for k in ("loss", "dsm", "mae", "align") if k in sums]  # the same on every rank
    keys = parts + [f"{k}_count" for k in parts]
    values = dict(zip(keys, dist.all_reduce(torch.stack([sums[k] for k in keys])).tolist()))
    stats = {**{k: values[k] / max(values[f"{k}_count"], 1) for k in parts},
             "lr": engine.lr, "mask_ratio": ratio, "loss_scale": engine.loss_scale,
             "skipped_steps": engine.skipped_steps, "images_seen": state.images_seen,
             "device_hours": state.device_hours, "epoch": epoch, "stage": state.stage, **meter.read()}
    logger.scalars(state.step, stats)


class Health:
    """Per step, [diverged, stop requested] summed over ranks without a host sync of its own: each step's
    all-reduce starts asynchronously and is read one step later (long finished by then), or at once before a
    checkpoint or a log line, so that no checkpoint is ever written after a diverged step. Every precision is
    checked; what counts as divergence is Engine.divergence's (an fp16 overflow that the scaler skips is not).
    """

    def __init__(self, last_good: Path | None):
        self.last_good = last_good  # named when the run stops; kept up to date by run_stage
        self.pending: list[tuple[int, dist.Pending]] = []
        self.stop = False  # some rank asked to stop (seen in a step's reduced flags)
        self.flags = torch.eye(2, device=dist.device())[:, 1]  # [0., 1.]: a stop flag without a host copy

    def push(self, step: int, diverged: torch.Tensor, stop_requested: bool) -> None:
        """Start step `step`'s reduction; check the previous step's, which has long completed."""
        flags = torch.stack([diverged.float().reshape(()), self.flags[int(stop_requested)]])
        self.pending.append((step, dist.all_reduce_async(flags)))
        while len(self.pending) > 1:
            self._check(*self.pending.pop(0))

    def flush(self) -> None:
        """Check every step so far (waits for the last reduction): before a checkpoint, a log line, the end."""
        while self.pending:
            self._check(*self.pending.pop(0))

    def _check(self, step: int, pending: dist.Pending) -> None:
        diverged, stop = pending.result().tolist()
        self.stop = self.stop or stop > 0
        if diverged > 0:
            raise self.failure(step, "non-finite loss or gradient norm on some rank (the run diverged)")

    def check_weights(self, step: int, engine: Engine, ema: MasterEMA) -> None:
        """Collective, before a save: every rank's fp32 masters, module weights and EMA partition are finite."""
        bad = dist.all_reduce(torch.stack([1 - engine.weights_finite(), 1 - ema.finite()])).tolist()
        if any(bad):
            what = " and ".join(name for name, n in zip(("weights", "EMA"), bad) if n)
            raise self.failure(step, f"non-finite {what} before the checkpoint (the run diverged)")

    def failure(self, step: int, what: str) -> TrainingError:
        """The one-line stop: what happened, and the newest checkpoint that is still good."""
        last = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was written"
        return TrainingError(f"step {step}: {what}; nothing was saved after it, and {last}. Lower optim.lr or "
                             "change engine.precision.")
