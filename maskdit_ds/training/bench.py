"""Training-step benchmark: mask ratios (and strategies) side by side on the real DeepSpeed engine, eager and/or
compiled, optionally against a plain-PyTorch baseline (same network and loss, torch AdamW, autocast; no
DeepSpeed), and optionally with representation alignment (teacher forward + projector), all interleaved in one
run (maskdit_ds.timing). One process, one device. MFU counts the trunk's FLOPs only; images/s includes everything.
"""
from __future__ import annotations

import copy
import statistics
from pathlib import Path

import torch

from .. import dist
from ..config import load_config, resolve_auto
from ..diffusion import MaskedEDMLoss
from ..hardware import DTYPES, TRAINING_MODES, device_peak_tflops, sampling_precision
from ..model import Masker, build_denoiser, gemm_shapes, get_size, materialise, token_grid, train_flops
from ..model.align import AlignedDenoiser
from ..model.teacher import load_teacher
from ..timing import interleave, time_calls
from .engine import Engine, compile_enabled, init_distributed, optimizer_impl, profiled_phases
from .stats import mfu, peak_memory_gb


def bench_config(model: str, input_size: int, channels: int, batch: int, precision: str, strategy: str = "random",
                 block_size: int = 2, world_size: int = 1):
    """batch: per rank (no accumulation)."""
    cfg = load_config("digits", [f"model.name={model}", f"model.input_size={input_size}",
                                 f"model.in_channels={channels}", "model.num_classes=1000",
                                 f"data.resolution={input_size}", f"train.micro_batch={batch}",
                                 f"train.global_batch={batch * world_size}", f"engine.precision={precision}",
                                 "train.stages=[]", f"mask.strategy={strategy}", f"mask.block_size={block_size}"])
    return resolve_auto(cfg)[0]


class TorchBaseline:
    """The same step without DeepSpeed, as the paper's loop trains: fp32 weights, torch AdamW, torch.autocast in
    the mode's matmul dtype (bf16/fp16), torch's GradScaler for fp16, and torch's DDP across ranks. Quotes what
    the engine costs or saves against the usual hand-written PyTorch loop, and is the reference of
    training/numerics.py. Its AdamW kernel is the engine's (engine.optimizer), so the two differ by the engine
    alone."""

    def __init__(self, net: torch.nn.Module, lr: float, precision: str, optimizer: str = "auto"):
        self.net = dist.data_parallel(net)
        fused = optimizer_impl(optimizer) == "torch_fused"
        self.opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                     fused=fused)
        matmul = TRAINING_MODES[precision].matmul
        self.dtype = None if matmul == "fp32" else DTYPES[matmul]
        self.scaler = torch.amp.GradScaler(dist.device().type, enabled=matmul == "fp16")

    def __call__(self, *args, **kwargs):
        with torch.autocast(dist.device().type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.net(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)


def engines(cfg, compile: str, build, ds_configs: tuple[str, ...] = ()) -> dict:
    """DeepSpeed runners by name: eager, compiled (engine.compile=true), or both to interleave them; with
    ds_configs, one more engine per named ds_config (shipped name or path: engine settings side by side), named
    by its file. build() makes each a fresh network on the bench's device."""
    chosen = {"both": ("false", "true"), "on": ("true",), "off": ("false",), "auto": (cfg.engine.compile,)}[compile]
    out = {}
    for choice in chosen:
        cfg.engine.compile = choice
        suffix = "+compile" if compile_enabled(choice) else ""
        out["deepspeed" + suffix] = Engine(build(), cfg, world_size=dist.world_size())
        for ds_config in ds_configs:
            variant = copy.deepcopy(cfg)
            variant.engine.ds_config = ds_config
            out[f"deepspeed[{Path(ds_config).stem}]" + suffix] = Engine(build(), variant, dist.world_size())
    return out


def runners_for(cfg, compile: str, baseline: bool, deepspeed: bool, build, ds_configs: tuple[str, ...] = ()) -> dict:
    runners = engines(cfg, compile, build, ds_configs) if deepspeed else {}
    if baseline or not deepspeed:
        runners["torch"] = TorchBaseline(build(), cfg.optim.lr, cfg.engine.precision, cfg.engine.optimizer)
    return runners


def step_fn(runner, loss_fn: MaskedEDMLoss, masker: Masker, x: torch.Tensor, y: torch.Tensor, teacher=None,
            images: torch.Tensor | None = None):
    """One training step (forward, backward, optimizer) of `runner` on a fixed batch; with a teacher, its forward
    on `images` is part of the step, as in training."""
    def step() -> None:
        target = None if teacher is None else teacher(images)
        loss, _ = loss_fn(runner, x, y, masker, target)
        runner.backward(loss.mean())
        runner.step()
    return step


def alignment_modes(cfg, align: dict, compile: str, baseline: bool, deepspeed: bool, maskers: dict, x, y) -> dict:
    """The same runners training AlignedDenoisers (REPA's projector) with the teacher's forward in every step."""
    device, grid = dist.device(), token_grid(cfg.model)
    teacher = load_teacher(align["teacher"], align["resolution"], grid, device, DTYPES[sampling_precision("auto")])
    size = get_size(cfg.model.name)
    loss_fn = MaskedEDMLoss(size.patch_size, cfg.model.num_classes, label_dropout=0.1, aligned=True,
                            align_weight=0.5)
    # the clean images the loader serves beside latents: uint8 at the teacher's resolution (pixel runs: x itself)
    images = x if x.shape[1] in (1, 3) else torch.randint(0, 256, (len(x), 3, align["resolution"],
                                                                   align["resolution"]), device=device,
                                                          dtype=torch.uint8)

    def build():  # on the meta device, initialised on the bench's device (no CPU init of an XL/2)
        with torch.device("meta"):
            net = AlignedDenoiser(build_denoiser(cfg.model, "meta"), align["depth"], align["proj_dim"], teacher.dim)
        return materialise(net, device)

    runners = runners_for(cfg, compile, baseline, deepspeed, build)
    return {(f"{name}+align", r): step_fn(runner, loss_fn, maskers[r], x, y, teacher, images)
            for name, runner in runners.items() for r in maskers}


def peak_memory(fn) -> float:
    """GPU: peak allocated during fn (GiB). CPU: the process's peak RSS so far (it only grows, so per-mode
    figures are not separable there)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    fn()
    return peak_memory_gb()


def run(model="MaskDiT-S/2", input_size=32, channels=4, batch=16, precision="auto", ratios=(0.5, 0.0),
        rounds=5, steps=5, warmup=3, baseline=False, compile="auto", strategy="random", block_size=2,
        deepspeed=True, align: dict | None = None, ds_configs: tuple[str, ...] = (),
        profile_steps: int = 0) -> tuple[list[dict], dict]:
    """align: {"teacher", "resolution", "depth", "proj_dim"} adds every runner again with alignment. Under a
    launcher every rank runs the same steps (batch per rank; the baseline in DDP). Returns the rows and, with
    profile_steps, each mode's profile (profile_modes)."""
    init_distributed()
    cfg = bench_config(model, input_size, channels, batch, precision, strategy, block_size, dist.world_size())
    torch.manual_seed(0)
    runners = runners_for(cfg, compile, baseline, deepspeed, lambda: build_denoiser(cfg.model, dist.device()),
                          ds_configs)
    size, grid, device = get_size(model), token_grid(cfg.model), dist.device()
    loss_fn = MaskedEDMLoss(size.patch_size, cfg.model.num_classes, label_dropout=0.1)
    x = torch.randn(batch, channels, input_size, input_size, device=device)
    y = torch.randint(0, cfg.model.num_classes, (batch,), device=device)
    maskers = {r: Masker(strategy, grid, r, block_size) for r in ratios}
    modes = {(name, r): step_fn(runner, loss_fn, maskers[r], x, y) for name, runner in runners.items() for r in ratios}
    if align:
        modes.update(alignment_modes(cfg, align, compile, baseline, deepspeed, maskers, x, y))
    memory = {mode: peak_memory(lambda fn=fn: time_calls(fn, warmup)) for mode, fn in modes.items()}
    times = interleave(modes, rounds, steps)
    profiles = profile_modes(modes, profile_steps) if profile_steps else {}
    rows = []
    for (name, r), values in times.items():
        med, kept = statistics.median(values), maskers[r].kept
        flops = train_flops(size, input_size, channels, kept) * batch / med / 1e12
        peak, peak_source = device_peak_tflops(cfg.engine.precision, cfg.engine.tf32,
                                               gemm_shapes(size, input_size, batch, kept))
        rows.append({"runner": name, "precision": cfg.engine.precision, "mask_ratio": r, "strategy": strategy,
                     "kept_tokens": kept, "median_step_s": med, "images_per_s": batch / med, "tflops": flops,
                     "mfu": mfu(flops, peak), "peak_mem_gb": memory[name, r], "peak_source": peak_source,
                     "steps_timed": len(values),
                     "flop_ratio_vs_unmasked": train_flops(size, input_size, channels) /
                     train_flops(size, input_size, channels, kept)})
    base = next((row for row in rows if row["mask_ratio"] == 0.0), rows[-1])
    by_mode = {(row["runner"], row["mask_ratio"]): row for row in rows}
    for row in rows:
        row["speedup_vs_unmasked"] = base["median_step_s"] / row["median_step_s"]
        plain = by_mode.get((row["runner"].removesuffix("+align"), row["mask_ratio"]))
        row["align_overhead"] = row["median_step_s"] / plain["median_step_s"] if plain else 1.0
        aligned = "+align" if row["runner"].endswith("+align") else ""
        torch_row = by_mode.get(("torch" + aligned, row["mask_ratio"]))
        row["vs_torch"] = row["median_step_s"] / torch_row["median_step_s"] if torch_row else None
        row["world_size"] = dist.world_size()
    return rows, profiles


def profile_modes(modes: dict, steps: int) -> dict:
    """torch.profiler over `steps` more steps of each mode, DeepSpeed's ZeRO-2 phases labelled: per mode, the
    self time per step of every op (the device's time on GPUs, the CPU's on CPUs) and the total time per step
    of every phase, in milliseconds."""
    from torch.profiler import ProfilerActivity, profile

    gpu = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if gpu else [])]
    out = {}
    for mode, fn in modes.items():
        with profiled_phases(), profile(activities=activities) as prof:
            time_calls(fn, steps)
        events = prof.key_averages()
        ops = {e.key: (e.self_device_time_total if gpu else e.self_cpu_time_total) / steps / 1e3
               for e in events if not e.key.startswith("zero2: ")}
        phases = {e.key: e.cpu_time_total / steps / 1e3 for e in events if e.key.startswith("zero2: ")}
        out[mode] = {"ops": ops, "phases": phases}
    return out


def format_profile(profiles: dict, top: int = 8) -> str:
    """For each engine mode against the plain loop at the same mask ratio: the ops that take the most extra
    time per step (engine minus plain), and DeepSpeed's phases."""
    lines = []
    for (name, ratio), prof in profiles.items():
        plain = profiles.get(("torch", ratio))
        if name == "torch" or plain is None:
            continue
        extra = {op: ms - plain["ops"].get(op, 0.0) for op, ms in prof["ops"].items()}
        total = sum(prof["ops"].values()) - sum(plain["ops"].values())
        lines += [f"{name} vs torch, mask ratio {ratio}: {total:+.1f} ms per step of op self time",
                  "| op | engine ms/step | plain ms/step | extra ms/step |", "|---|---|---|---|"]
        for op, ms in sorted(extra.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"| {op} | {prof['ops'][op]:.1f} | {plain['ops'].get(op, 0.0):.1f} | {ms:+.1f} |")
        lines += ["| DeepSpeed phase (total, nested) | ms/step |", "|---|---|"]
        lines += [f"| {label} | {ms:.1f} |" for label, ms in sorted(prof["phases"].items(), key=lambda kv: -kv[1])]
        lines.append("")
    return "\n".join(lines)


def format_rows(rows: list[dict], header: str) -> str:
    lines = [header, "| runner | mask ratio | kept tokens | median step (s) | images/s | TFLOP/s | MFU "
                     "| peak mem (GiB) | speed-up vs first r=0 | FLOP ratio 0/r | step time vs unaligned "
                     "| step time vs torch |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shown = "n/a" if r["mfu"] is None else f"{r['mfu']:.3f}"
        vs_torch = "n/a" if r["vs_torch"] is None else f"{r['vs_torch']:.3f}x"
        lines.append(f"| {r['runner']} | {r['mask_ratio']} | {r['kept_tokens']} | {r['median_step_s']:.4f} "
                     f"| {r['images_per_s']:.1f} | {r['tflops']:.3f} | {shown} | {r['peak_mem_gb']:.2f} "
                     f"| {r['speedup_vs_unmasked']:.2f}x | {r['flop_ratio_vs_unmasked']:.2f}x "
                     f"| {r['align_overhead']:.2f}x | {vs_torch} |")
    first = rows[0]
    lines.append(f"(MFU against: {first['peak_source']}, trunk FLOPs only; {first['steps_timed']} timed steps per "
                 f"mode, interleaved, {first['world_size']} rank(s), batch per rank; mask strategy "
                 f"{first['strategy']}; +align: teacher forward and projector in the step)")
    return "\n".join(lines)
