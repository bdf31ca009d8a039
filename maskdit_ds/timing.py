"""The one timing loop of the benchmarks: modes interleaved round by round (in a rotating order), so that every
mode sees the same machine noise; quote medians per mode and ratios between modes measured in the same run."""
from __future__ import annotations

import time
from typing import Callable

import torch


def sync() -> None:
    """Wait for queued GPU work, so that a timer brackets the work itself."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of fn, synchronised before and after each."""
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def interleave(modes: dict, rounds: int, repeats: int, warmup: int = 0) -> dict:
    """{name: fn} -> {name: [seconds per call]}: `warmup` untimed calls per mode, then `rounds` rounds of
    `repeats` timed calls per mode, the mode order rotating each round."""
    names = list(modes)
    for name in names:
        time_calls(modes[name], warmup)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name] += time_calls(modes[name], repeats)
    return times
