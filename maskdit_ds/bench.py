"""Training-step benchmark: masked and unmasked steps interleaved in one run on the real engine (one rank).

Interleaving (A B A B ...) exposes both modes to the same machine noise; we report medians per mode and ratios.
"""
from __future__ import annotations

import statistics
import time

import torch

from . import dist
from .config import load_config
from .engine import Engine, init_distributed
from .loss import MaskedEDMLoss
from .metrics import device_peak_tflops, peak_memory_gb
from .model import build_denoiser, get_size, train_flops


def bench_config(model: str, input_size: int, channels: int, batch: int, precision: str):
    return load_config("digits", [f"model.name={model}", f"model.input_size={input_size}",
                                  f"model.in_channels={channels}", "model.num_classes=1000",
                                  f"train.micro_batch={batch}", f"train.global_batch={batch}",
                                  f"engine.precision={precision}", "train.stages=[]"])


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


def peak_memory(fn) -> float:
    """GPU: peak allocated during fn (GiB). CPU: the process's peak RSS so far (it only grows, so per-mode
    figures are not separable there)."""
    if not torch.cuda.is_available():
        fn()
        return peak_memory_gb()
    torch.cuda.reset_peak_memory_stats()
    fn()
    return torch.cuda.max_memory_allocated() / 2**30


def run(model="MaskDiT-S/2", input_size=32, channels=4, batch=16, precision="bf16", ratios=(0.5, 0.0),
        rounds=5, steps=5, warmup=3) -> list[dict]:
    init_distributed()
    cfg = bench_config(model, input_size, channels, batch, precision)
    torch.manual_seed(0)
    engine = Engine(build_denoiser(cfg.model).to(dist.device()), cfg, world_size=1)
    size = get_size(model)
    loss_fn = MaskedEDMLoss(size.patch_size, cfg.model.num_classes, label_dropout=0.1)
    times = {r: [] for r in ratios}
    memory = {}
    for r in ratios:
        memory[r] = peak_memory(lambda: time_steps(engine, loss_fn, cfg, r, warmup))
    for _ in range(rounds):
        for r in ratios:  # interleaved, so every mode sees the same noise
            times[r] += time_steps(engine, loss_fn, cfg, r, steps)
    peak, peak_source = device_peak_tflops(precision)
    rows = []
    for r in ratios:
        med = statistics.median(times[r])
        flops = train_flops(size, input_size, channels, r) * batch / med / 1e12
        rows.append({"mask_ratio": r, "median_step_s": med, "images_per_s": batch / med, "tflops": flops,
                     "mfu": flops / peak if peak else float("nan"), "peak_mem_gb": memory[r],
                     "peak_source": peak_source, "steps_timed": len(times[r])})
    base = next((row for row in rows if row["mask_ratio"] == 0.0), rows[-1])
    for row in rows:
        row["speedup_vs_unmasked"] = base["median_step_s"] / row["median_step_s"]
    return rows


def format_rows(rows: list[dict], header: str) -> str:
    lines = [header, "| mask ratio | median step (s) | images/s | TFLOP/s | MFU | peak mem (GiB) | speed-up vs r=0 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mask_ratio']} | {r['median_step_s']:.4f} | {r['images_per_s']:.1f} | {r['tflops']:.3f} "
                     f"| {r['mfu']:.3f} | {r['peak_mem_gb']:.2f} | {r['speedup_vs_unmasked']:.2f}x |")
    lines.append(f"(MFU against: {rows[0]['peak_source']}; {rows[0]['steps_timed']} timed steps per mode, "
                 f"interleaved)")
    return "\n".join(lines)
