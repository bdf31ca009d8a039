"""A run's figures: rank-0 logging behind one interface (stats.jsonl, TensorBoard, a progress bar) and the
throughput, MFU and peak memory every run reports."""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from .. import dist
from ..io import atomic_write_text, storage_guard


def peak_memory_gb() -> float:
    """Peak GPU memory allocated, or peak resident memory of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def mfu(tflops: float, peak_tflops: float) -> float | None:
    """Achieved / peak. None (absent) without a known peak, or when the ratio leaves [0, 1]: then the peak does
    not describe this work (a CPU measurement disturbed by other load, say) and a number would mislead."""
    if peak_tflops <= 0:
        return None
    ratio = tflops / peak_tflops
    return ratio if 0.0 <= ratio <= 1.0 else None


class Throughput:
    """Images/s, TFLOP/s and MFU over the window since the last call."""

    def __init__(self, flops_per_image, peak_tflops_per_device: float, world: int):
        self.flops_per_image, self.peak, self.world = flops_per_image, peak_tflops_per_device, world
        self.reset()

    def reset(self) -> None:
        self.start, self.images, self.flops = time.perf_counter(), 0, 0.0

    def add(self, images: int, kept_tokens: int) -> None:
        self.images += images
        self.flops += images * self.flops_per_image(kept_tokens)

    def read(self) -> dict:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tflops = self.flops / elapsed / 1e12
        out = {"images_per_s": self.images / elapsed, "tflops": tflops, "mfu": mfu(tflops, self.peak * self.world),
               "peak_mem_gb": peak_memory_gb()}
        self.reset()
        return out


class DeviceClock:
    """Cumulative device-hours of training (wall time x devices) in TrainState.device_hours, charged as the run
    goes; time spent evaluating (sample grids, in-training FID and agreement) is skipped, so that runs compare by
    the compute that trained them. Counting starts at the first stage; a resume continues the saved count (the
    steps redone after a preemption are counted once)."""

    def __init__(self, devices: int):
        self.devices, self.mark = devices, time.perf_counter()

    def charge(self, state, agree: bool = False) -> None:
        """Add the time since the last charge or skip to state.device_hours. agree (collective, before a save):
        every rank takes rank 0's count, since each rank's clock differs slightly and the saved train states of
        all ranks must match (resharding checks that)."""
        now = time.perf_counter()
        state.device_hours += (now - self.mark) * self.devices / 3600
        self.mark = now
        if agree:
            state.device_hours = dist.broadcast_from_main(state.device_hours)

    def skip(self) -> None:
        """Not charged: the time since the last charge (evaluation)."""
        self.mark = time.perf_counter()


def truncate_stats(path: Path, step: int) -> None:
    """Drop stats.jsonl lines after `step` (a crash-resume replays them), atomically; torn lines go too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by the crash
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


class RunLogger:
    """On rank 0: stats.jsonl, TensorBoard scalars/images, tqdm bar. Elsewhere every method is a no-op."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        run_dir.mkdir(parents=True, exist_ok=True)
        truncate_stats(run_dir / "stats.jsonl", start_step)
        self.stats = open(run_dir / "stats.jsonl", "a")
        # purge_step: TensorBoard drops the earlier files' events from start_step on (logged after the checkpoint
        # that a crashed run resumes from), so resumed curves do not overlap themselves
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step or None)
        if start_step:
            self.tb.add_text("run", f"resumed at step {start_step}", start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stdout,
                        mininterval=1.0)

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with storage_guard(Path(self.stats.name), "stats"):
            self.stats.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
            self.stats.flush()
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(key, value, step)
        shown = ("loss", "dsm", "mae", "align", "lr", "mask_ratio", "loss_scale", "images_per_s", "tflops", "mfu",
                 "peak_mem_gb")
        self.bar.set_postfix({k: f"{values[k]:.4g}" for k in shown if values.get(k) is not None}, refresh=False)

    def image(self, tag: str, grid_hwc, step: int) -> None:
        if self.enabled:
            self.tb.add_image(tag, grid_hwc, step, dataformats="HWC")

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self.bar.update(steps)

    def close(self) -> None:
        """Flush and close the files, and end the writers' threads (TensorBoard's, tqdm's monitor)."""
        if self.enabled:
            self.bar.close()
            self.stats.close()
            self.tb.close()
            monitor = getattr(type(self.bar), "monitor", None)
            if monitor is not None:
                monitor.exit()  # tqdm makes a new one for the next bar
