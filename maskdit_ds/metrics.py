"""Rank-0 logging behind one interface: stats.jsonl, TensorBoard, a progress bar, throughput, MFU, peak memory."""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

# Dense peak TFLOP/s per device (fp16/bf16 tensor cores; fp32 = TF32 where the card has it).
GPU_PEAKS = {"A100": {"half": 312.0, "fp32": 156.0}, "H100": {"half": 989.0, "fp32": 494.0},
             "H200": {"half": 989.0, "fp32": 494.0}, "V100": {"half": 125.0, "fp32": 15.7}}


def measured_cpu_peak(precision: str) -> float:
    """A CPU has no data-sheet peak we can trust: time a 1024^3 GEMM in the run's dtype (best of 5)."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    # Its own generator: drawing from the global RNG here would shift the training noise after a resume.
    a = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0)).to(dtype)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best / 1e12


def device_peak_tflops(precision: str, configured: float = 0.0) -> tuple[float, str]:
    if configured > 0:
        return configured, "configured"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peaks in GPU_PEAKS.items():
            if key in name:
                return peaks["fp32" if precision == "fp32" else "half"], name
        return 0.0, f"unknown GPU {name}"
    return measured_cpu_peak(precision), "measured CPU GEMM"


def peak_memory_gb() -> float:
    """Peak GPU memory allocated, or peak resident memory of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Throughput:
    """Images/s, TFLOP/s and MFU over the window since the last call."""

    def __init__(self, flops_per_image, peak_tflops_per_device: float, world: int):
        self.flops_per_image, self.peak, self.world = flops_per_image, peak_tflops_per_device, world
        self.reset()

    def reset(self) -> None:
        self.start, self.images, self.flops = time.perf_counter(), 0, 0.0

    def add(self, images: int, mask_ratio: float) -> None:
        self.images += images
        self.flops += images * self.flops_per_image(mask_ratio)

    def read(self) -> dict:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tflops = self.flops / elapsed / 1e12
        mfu = tflops / (self.peak * self.world) if self.peak > 0 else float("nan")
        out = {"images_per_s": self.images / elapsed, "tflops": tflops, "mfu": mfu, "peak_mem_gb": peak_memory_gb()}
        self.reset()
        return out


class RunLogger:
    """On rank 0: stats.jsonl, TensorBoard scalars/images, tqdm bar. Elsewhere every method is a no-op."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        run_dir.mkdir(parents=True, exist_ok=True)
        self.stats = open(run_dir / "stats.jsonl", "a")
        self.tb = SummaryWriter(str(run_dir / "tb"))
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stdout,
                        mininterval=1.0)

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.stats.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self.stats.flush()
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)
        shown = ("loss", "dsm", "mae", "lr", "mask_ratio", "loss_scale", "images_per_s", "tflops", "mfu",
                 "peak_mem_gb")
        self.bar.set_postfix({k: f"{values[k]:.4g}" for k in shown if k in values}, refresh=False)

    def image(self, tag: str, grid_hwc, step: int) -> None:
        if self.enabled:
            self.tb.add_image(tag, grid_hwc, step, dataformats="HWC")

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.stats.close()
            self.tb.close()
