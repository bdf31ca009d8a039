"""What must survive a resume besides the weights: the step counters and every random number generator."""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch


@dataclasses.dataclass
class TrainState:
    step: int = 0  # optimizer steps over the whole lineage (continues across stages and init_from)
    stage: int = 0  # index into the stage list
    stage_step: int = 0  # optimizer steps done in the current stage
    images_seen: int = 0
    device_hours: float = 0.0  # training wall time x devices, evaluation excluded (stats.DeviceClock)


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
