"""The training run, top to bottom: MaskDiT's masked phase and unmasked tuning (docs/method.md §4) in stages.

Every rank runs train(cfg):
  1. the plan: auto precision, validation, the run-directory lock, where to start, config.yaml   (plan.py)
  2. the data                                                                                     (data/)
  3. the model (with REPA's projector when the run aligns, and the frozen teacher), its fp32 EMA, and the
     starting point: a resume, train.init_from, or fresh                                          (checkpoint.py)
  4. the stages: a new DeepSpeed engine at each boundary (precision, optimizer and lr may change; EMA, step
     count and data position continue), each driving the step loop run_stage()
  5. samples from the EMA                                                                         (previews.py)
"""
from __future__ import annotations

import copy
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .. import dist, io
from ..config import Config, DataConfig, LossConfig, ModelConfig, aligns, grad_accum, stages_of
from ..data import ResumableLoader, build_dataset, teacher_input, to_model_input
from ..diffusion import MaskedEDMLoss, ema_update, mask_ratio_at
from ..errors import EXIT_PREEMPTED, TrainingError
from ..hardware import DTYPES, device_peak_tflops, sampling_precision
from ..model import Masker, build_denoiser, gemm_shapes, get_size, kept_tokens, token_grid, train_flops
from ..model.align import AlignedDenoiser, denoiser_of
from ..model.teacher import Teacher, load_teacher
from . import checkpoint as ckpt
from .engine import Engine, consolidated_fp32_state, init_distributed
from .lifecycle import StopRequest
from .plan import decide_start, lock_run_dir, prepare, stage_configs
from .previews import AgreementMonitor, FIDMonitor, final_samples, log_grid
from .reshard import resume_source
from .state import TrainState, seed_everything, set_rng_state
from .stats import DeviceClock, RunLogger, Throughput


def train(cfg: Config) -> int:
    init_distributed(cfg.dist.timeout_s or None)
    cfg = prepare(cfg, dist.world_size())
    dist.check_shared_dir(cfg.run_dir)  # every host must write the same run directory
    lock = lock_run_dir(cfg)
    try:
        with dist.naming_lost_peers():  # a rank or host gone mid-run: one line naming it, exit 5
            return train_locked(cfg)
    finally:
        lock.release()


def train_locked(cfg: Config) -> int:
    # 1. The starting point is decided (and config.yaml written) before anything else touches the run directory.
    resume = decide_start(cfg, dist.world_size())
    seed_everything(cfg.run.seed + dist.rank())  # different masks, noise and label dropout per rank

    # 2. Data (with the source images beside latents when the teacher needs them).
    teacher = build_teacher(cfg) if aligns(cfg) else None
    images_at = cfg.loss.align_teacher_resolution if teacher is not None else 0
    dataset = build_dataset(cfg.data, cfg.model, cfg.run.seed, images_at=images_at)

    # 3. Model, EMA (fp32, the denoiser alone), and where we start from.
    net = build_module(cfg, teacher)
    ema = copy.deepcopy(denoiser_of(net)).to(dist.device()).eval().requires_grad_(False)
    start = starting_point(cfg, resume, net, ema)

    # 4. Stages.
    stages, state = stages_of(cfg), start.state
    total = state.step - state.stage_step + sum(s.steps for s in stages[state.stage:])
    logger = RunLogger(cfg.run_dir, dist.is_main(), total_steps=total, start_step=state.step)
    try:  # the progress bar closes (ends its line) however the run ends
        # the FID monitor fails on every rank, before training, if its weights or reference are wrong
        run = Run(ema, state, logger, StopRequest(say=dist.print0), build_monitors(cfg), teacher,
                  DeviceClock(dist.world_size()))
        for index in range(state.stage, len(stages)):
            stage = build_stage(stage_configs(cfg)[index], stages[index], index, dataset, start, logger.message)
            code = run_stage(stage, run)
            if code is not None:
                return code
            if index + 1 == len(stages):
                stage.engine.release()  # nothing to hand over after the last stage
                break
            start.net, start.data_state = hand_over(stage, teacher)
            state.stage, state.stage_step = index + 1, 0

        # 5. Samples from the EMA.
        final_samples(cfg, ema, logger, state)
        run.stop.exiting()  # the run is complete: a late SLURM signal must not turn exit 0 into 143
        return 0
    finally:
        logger.close()


def build_teacher(cfg: Config) -> Teacher:
    """The frozen alignment teacher on this rank's device (half precision on GPUs), its features pooled to the
    denoiser's token grid."""
    dtype = DTYPES[sampling_precision("auto")]  # inference precision: bf16 (fp16) on GPUs, fp32 on CPUs
    teacher = load_teacher(cfg.loss.align_teacher, cfg.loss.align_teacher_resolution, token_grid(cfg.model),
                           dist.device(), dtype)
    dist.print0(f"[align] teacher {cfg.loss.align_teacher}: {teacher.dim}-d patch features at "
                f"{teacher.resolution} px ({teacher.patch_grid}x{teacher.patch_grid} patches -> the "
                f"{teacher.grid}x{teacher.grid} token grid), {next(teacher.parameters()).dtype}, frozen")
    return teacher


def build_module(cfg: Config, teacher: Teacher | None) -> torch.nn.Module:
    """What the engine trains: the denoiser, plus REPA's projector when the run aligns."""
    net = build_denoiser(cfg.model)
    if teacher is None:
        return net
    return AlignedDenoiser(net, cfg.loss.align_depth, cfg.loss.align_proj_dim, teacher.dim)


def build_monitors(cfg: Config) -> dict:
    """The in-training quality checks, by the stats key they log. The FID monitor fails on every rank, before
    training, if its weights or reference are wrong."""
    monitors = {}
    if cfg.eval.fid_every:
        monitors["fid"] = FIDMonitor(cfg)
    if cfg.eval.agreement_every:
        monitors["digits_class_agreement"] = AgreementMonitor(cfg)
    return monitors


# ---------------------------------------------------------------- where the stages pick up


@dataclass
class Start:
    """The weights to train (net), the counters, the data position, and DeepSpeed state for the first engine."""

    net: torch.nn.Module
    state: TrainState
    data_state: dict | None = None
    rank_state: dict | None = None  # a resumed tag's per-rank state (RNG) while its DeepSpeed state is pending
    ds_tag: str | None = None  # the tag (relative to checkpoints/) the first engine loads
    universal: bool = False  # that tag is a universal checkpoint (saved on another world size)


def starting_point(cfg: Config, resume: str | None, net, ema) -> Start:
    """A resume of `resume` (the EMA loaded here, DeepSpeed state by the first stage's engine), train.init_from,
    or the fresh network."""
    start = Start(net, TrainState())
    if resume:
        tag_dir = cfg.run_dir / "checkpoints" / resume
        # Saved on another world size: rank 0 makes <tag>/universal (DeepSpeed universal checkpoint + per-rank
        # states for this world size) once; every rank then loads from there.
        state_dir, start.ds_tag, start.universal = resume_source(tag_dir, dist.world_size())
        start.rank_state = ckpt.load_rank_state(state_dir, dist.rank())
        start.state, start.data_state = TrainState(**start.rank_state["train"]), start.rank_state["data"]
        ema.load_state_dict(load_file(str(tag_dir / ckpt.EMA_FILE)))
        dist.print0(f"[resume] from {tag_dir} (step {start.state.step}, stage {start.state.stage})"
                    + (f", resharded to {dist.world_size()} ranks via {state_dir}" if start.universal else ""))
        if start.state.stage_step >= stages_of(cfg)[start.state.stage].steps:
            skip_finished_stage(cfg, start, tag_dir)
    elif cfg.train.init_from:
        record = ckpt.init_from(Path(cfg.train.init_from), denoiser_of(net), ema, start.state, cfg.train.reset_ema,
                                dist.print0)
        if dist.is_main():
            io.atomic_write_text(cfg.run_dir / "lineage.json", json.dumps({**ckpt.lineage(cfg), **record}, indent=2))
        dist.print0(f"[init] {record}")
    return start


def skip_finished_stage(cfg: Config, start: Start, tag_dir: Path) -> None:
    """A tag saved at the end of a stage: the next stage starts from its fp32 masters with a new engine, exactly
    as an uninterrupted run hands over (same weights, same RNG); a finished run trains nothing."""
    start.net.load_state_dict(consolidated_fp32_state(tag_dir))
    set_rng_state(start.rank_state["rng"])
    start.rank_state, start.ds_tag = None, None
    start.state.stage, start.state.stage_step = start.state.stage + 1, 0
    if start.state.stage == len(stages_of(cfg)):
        dist.print0(f"[resume] training already finished at step {start.state.step}; nothing left to train")


# ---------------------------------------------------------------- one stage


@dataclass
class Stage:
    """One stage as the step loop sees it: its config, its length, and the engine and loader built for it."""

    cfg: Config
    index: int
    name: str
    steps: int
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


def build_stage(cfg: Config, plan, index: int, dataset, start: Start, say) -> Stage:
    """The stage's loader (at the carried data position) and engine (with a resumed tag's DeepSpeed state)."""
    loader = ResumableLoader(dataset, cfg.train.micro_batch, dist.rank(), dist.world_size(), cfg.run.seed,
                             num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available())
    if start.data_state:
        loader.load_state_dict(start.data_state)
    engine = Engine(start.net.to(dist.device()), cfg, dist.world_size(),
                    load_universal=start.universal and start.ds_tag is not None)
    if start.ds_tag is not None:  # only the stage we resumed in loads DeepSpeed state
        engine.load(cfg.run_dir / "checkpoints", start.ds_tag)
        set_rng_state(start.rank_state["rng"])
        start.rank_state, start.ds_tag = None, None
    say(f"[stage {index}] {plan.name}: {plan.steps} steps, {cfg.engine.precision}, mask ratio {cfg.mask.ratio}, "
        f"lr {cfg.optim.lr}")
    return Stage(cfg, index, plan.name, plan.steps, engine, loader)


def hand_over(stage: Stage, teacher: Teacher | None) -> tuple[torch.nn.Module, dict]:
    """The fp32 masters in a fresh network for the next stage's engine, and the data position."""
    weights = stage.engine.full_fp32_state()
    stage.engine.release()
    with torch.random.fork_rng(devices=[]):  # its random init is overwritten; a resume at this boundary
        net = build_module(stage.cfg, teacher)  # skips it, so it must not move the RNG
    net.load_state_dict(weights)
    return net, stage.loader.state_dict()


def run_stage(stage: Stage, run: Run) -> int | None:
    """Train until the stage has its steps. Returns EXIT_PREEMPTED if stopped by a signal or the launcher."""
    cfg, state, engine = stage.cfg, run.state, stage.engine
    loss_fn = build_loss(cfg.model, cfg.loss, aligned=run.teacher is not None)
    meter = build_meter(cfg)
    health = Health(cfg.engine.precision, cfg.run_dir / "checkpoints")
    sums, streak, batches = new_sums(), 0, iter(stage.loader)
    accum = grad_accum(cfg, dist.world_size())

    while state.stage_step < stage.steps:
        ratio = mask_ratio_at(cfg.mask.ratio, cfg.mask.schedule, state.stage_step / stage.steps, cfg.mask.power)
        masker = Masker(cfg.mask.strategy, token_grid(cfg.model), ratio, cfg.mask.block_size)
        teacher = run.teacher if aligning(cfg.loss, state.step) else None
        skipped_before = engine.skipped_steps
        nonfinite = train_step(engine, batches, loss_fn, masker, teacher, cfg.data, accum, sums)
        health.push(state.step + 1, nonfinite, run.stop.requested)
        state.step, state.stage_step = state.step + 1, state.stage_step + 1
        state.images_seen += cfg.train.global_batch
        meter.add(cfg.train.global_batch, masker.kept)
        if engine.skipped_steps > skipped_before:  # fp16 overflow: weights unchanged, scale halved
            streak += 1
        else:
            streak = 0
            ema_update(run.ema, denoiser_of(engine.module), cfg.train.ema_decay)
        if streak >= cfg.train.max_skipped_streak:
            raise TrainingError(f"step {state.step}: {streak} consecutive fp16 steps overflowed (loss scale "
                                f"{engine.loss_scale:g}); the run diverged. Lower optim.lr or use bf16/fp32.")

        last = state.stage_step == stage.steps
        run.clock.charge(state)
        if state.step % cfg.train.log_every == 0 or last:
            health.flush()
            log_window(engine, state, sums, ratio, meter, run.logger, stage.loader.epoch)
            sums = new_sums()
        evaluate(cfg, run)
        if state.step % cfg.train.ckpt_every == 0 or last or health.stop:
            health.flush()  # never save after a non-finite step; and every rank agrees on stopping here
            run.clock.charge(state, agree=True)
            ckpt.save_checkpoint(cfg, engine, run.ema, state, stage.loader, run.logger.message)
        run.logger.advance()
        if health.stop:
            reasons = [r for r in dist.all_gather_objects(run.stop.reason) if r]
            run.logger.message(f"[stop] {reasons[0] if reasons else 'stop requested'}: saved step {state.step}, "
                               f"exiting {EXIT_PREEMPTED}")
            run.stop.exiting()
            return EXIT_PREEMPTED
    health.flush()
    return None


def aligning(loss_cfg: LossConfig, step: int) -> bool:
    """Whether optimizer step `step` (0-based, of the whole run) has the alignment term: the stage's weight is
    positive and align_until_step, if set, is not reached."""
    return loss_cfg.align_weight > 0 and (not loss_cfg.align_until_step or step < loss_cfg.align_until_step)


def evaluate(cfg: Config, run: Run) -> None:
    """Sample grids and in-training quality checks that are due; their time is not charged to device-hours.
    Each quality value is logged with the device-hours and images seen that reached it."""
    step, state = run.state.step, run.state
    due = [name for name, monitor in run.monitors.items() if monitor.due(step)]
    grid = cfg.train.grid_every and step % cfg.train.grid_every == 0
    if not due and not grid:
        return
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
    count of non-finite losses (plus 1 for a non-finite gradient norm) as a 0-dim device tensor. teacher: the
    frozen encoder whose features of the clean images the step aligns to (None: no alignment this step)."""
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
    grad_bad = engine.grad_norm_finite()
    return nonfinite if grad_bad is None else nonfinite + grad_bad


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
        stop = torch.tensor(float(stop_requested), device=nonfinite.device)
        self.pending.append((step, dist.all_reduce_async(torch.stack([nonfinite.float().reshape(()), stop]))))
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
