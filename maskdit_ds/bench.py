"""Training-step benchmark: masked and unmasked steps interleaved in one run on the real engine (one rank),
optionally against a plain-PyTorch baseline (same network and loss, torch AdamW, autocast; no DeepSpeed).

Interleaving (A B A B ...) exposes every mode to the same machine noise; we report medians per mode and ratios.
"""
from __future__ import annotations

import statistics
import time

import torch

from . import dist
from .config import load_config, resolve_auto
from .engine import Engine, compile_enabled, init_distributed
from .loss import MaskedEDMLoss
from .hardware import DTYPES, device_peak_tflops
from .metrics import mfu, peak_memory_gb
from .model import build_denoiser, gemm_shapes, get_size, train_flops


def bench_config(model: str, input_size: int, channels: int, batch: int, precision: str):
    cfg = load_config("digits", [f"model.name={model}", f"model.input_size={input_size}",
                                 f"model.in_channels={channels}", "model.num_classes=1000",
                                 f"train.micro_batch={batch}", f"train.global_batch={batch}",
                                 f"engine.precision={precision}", "train.stages=[]"])
    return resolve_auto(cfg)[0]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(engine, loss_fn, cfg, ratio: float, steps: int) -> list[float]:
    device = dist.device()
    x = torch.randn(cfg.train.micro_batch, cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size,
                    device=device)
    y = torch.randint(0, cfg.model.num_classes, (cfg.train.micro_batch,), device=device)
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        loss, _ = loss_fn(engine, x, y, ratio)
        engine.backward(loss.mean())
        engine.step()
        sync()
        times.append(time.perf_counter() - start)
    return times


class TorchBaseline:
    """The same step without DeepSpeed: fp32 weights, torch AdamW, autocast for bf16/fp16 (GradScaler for fp16).
    Quotes what the engine costs or saves against the usual hand-written PyTorch loop."""

    def __init__(self, net: torch.nn.Module, lr: float, precision: str):
        self.net = net
        fused = torch.cuda.is_available()
        self.opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                     fused=fused)
        self.dtype = None if precision == "fp32" else DTYPES[precision]
        self.scaler = torch.amp.GradScaler(enabled=precision == "fp16")

    def __call__(self, *args, **kwargs):
        with torch.autocast(dist.device().type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.net(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)


def peak_memory(fn) -> float:
    """GPU: peak allocated during fn (GiB). CPU: the process's peak RSS so far (it only grows, so per-mode
    figures are not separable there)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    fn()
    return peak_memory_gb()


def engines(cfg, compile: str) -> dict:
    """DeepSpeed runners by name: eager, compiled (engine.compile=true), or both to interleave them."""
    chosen = {"both": ("false", "true"), "on": ("true",), "off": ("false",), "auto": (cfg.engine.compile,)}[compile]
    out = {}
    for choice in chosen:
        cfg.engine.compile = choice
        name = "deepspeed+compile" if compile_enabled(choice) else "deepspeed"
        out[name] = Engine(build_denoiser(cfg.model).to(dist.device()), cfg, world_size=1)
    return out


def run(model="MaskDiT-S/2", input_size=32, channels=4, batch=16, precision="auto", ratios=(0.5, 0.0),
        rounds=5, steps=5, warmup=3, baseline=False, compile="auto") -> list[dict]:
    init_distributed()
    cfg = bench_config(model, input_size, channels, batch, precision)
    torch.manual_seed(0)
    runners = engines(cfg, compile)
    if baseline:
        runners["torch"] = TorchBaseline(build_denoiser(cfg.model).to(dist.device()), cfg.optim.lr,
                                         cfg.engine.precision)
    size = get_size(model)
    loss_fn = MaskedEDMLoss(size.patch_size, cfg.model.num_classes, label_dropout=0.1)
    modes = [(name, r) for name in runners for r in ratios]
    times = {mode: [] for mode in modes}
    memory = {mode: peak_memory(lambda: time_steps(runners[mode[0]], loss_fn, cfg, mode[1], warmup))
              for mode in modes}
    for _ in range(rounds):
        for mode in modes:  # interleaved, so every mode sees the same noise
            times[mode] += time_steps(runners[mode[0]], loss_fn, cfg, mode[1], steps)
    rows = []
    for name, r in modes:
        med = statistics.median(times[name, r])
        flops = train_flops(size, input_size, channels, r) * batch / med / 1e12
        peak, peak_source = device_peak_tflops(cfg.engine.precision, cfg.engine.tf32,
                                               gemm_shapes(size, input_size, batch, r))
        rows.append({"runner": name, "precision": cfg.engine.precision, "mask_ratio": r, "median_step_s": med, "images_per_s": batch / med,
                     "tflops": flops, "mfu": mfu(flops, peak),
                     "peak_mem_gb": memory[name, r], "peak_source": peak_source,
                     "steps_timed": len(times[name, r])})
    base = next((row for row in rows if row["mask_ratio"] == 0.0 and row["runner"].startswith("deepspeed")),
                rows[-1])
    for row in rows:
        row["speedup_vs_unmasked"] = base["median_step_s"] / row["median_step_s"]
    return rows


def format_rows(rows: list[dict], header: str) -> str:
    lines = [header, "| runner | mask ratio | median step (s) | images/s | TFLOP/s | MFU | peak mem (GiB) "
                     "| speed-up vs DeepSpeed r=0 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shown = "n/a" if r["mfu"] is None else f"{r['mfu']:.3f}"
        lines.append(f"| {r['runner']} | {r['mask_ratio']} | {r['median_step_s']:.4f} | {r['images_per_s']:.1f} "
                     f"| {r['tflops']:.3f} | {shown} | {r['peak_mem_gb']:.2f} | {r['speedup_vs_unmasked']:.2f}x |")
    lines.append(f"(MFU against: {rows[0]['peak_source']}; {rows[0]['steps_timed']} timed steps per mode, "
                 f"interleaved)")
    return "\n".join(lines)
