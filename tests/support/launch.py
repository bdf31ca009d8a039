"""Run the real trainer under the real `deepspeed` launcher with N CPU ranks, for end-to-end tests."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from maskdit_ds.dist import free_port
from repo import ROOT
# DeepSpeed's real fp16 path on a CPU without native fp16 (tests/support/cpu_fp16/sitecustomize.py)
FP16 = {"MASKDIT_TEST_CPU_FP16": "1", "PYTHONPATH": str(ROOT / "tests" / "support" / "cpu_fp16")}
# fp32 unless a test is about half precision: the same arithmetic on every CPU (auto would pick bf16 on some)
TINY = ["model.name=MaskDiT-T/2", "train.stages=[]", "train.micro_batch=8", "train.global_batch=16",
        "sample.final_samples=0", "train.grid_every=0", "train.log_every=1", "data.num_workers=0",
        "engine.precision=fp32", "model.input_size=16", "data.resolution=16"]


def env(**extra) -> dict:
    out = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **extra)
    return out


def command(out_dir: Path, name: str, overrides, ranks: int = 2, config: str = "digits") -> list[str]:
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
            str(free_port()), "--module", "maskdit_ds", "train", "--config", config,
            f"run.out_dir={out_dir}", f"run.name={name}", *overrides]


def train(out_dir: Path, name: str, overrides=(), ranks: int = 2, timeout: int = 300, **extra_env):
    """Run to completion; returns the CompletedProcess (stdout+stderr in .stdout)."""
    return subprocess.run(command(out_dir, name, [*TINY, *overrides], ranks), cwd=ROOT, env=env(**extra_env),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def start(out_dir: Path, name: str, overrides=(), ranks: int = 2, **extra_env) -> subprocess.Popen:
    return subprocess.Popen(command(out_dir, name, [*TINY, *overrides], ranks), cwd=ROOT, env=env(**extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def stats(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "stats.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(s["step"] >= step for s in stats(run_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    os.killpg(proc.pid, sig)
    proc.wait(timeout=60)


def export_random(folder: Path, name="MaskDiT-T/2", size=8, channels=3, classes=5, seed=0) -> Path:
    """An export folder with random (not zero-initialised) weights, as training writes it."""
    import torch

    from maskdit_ds.config import ModelConfig
    from maskdit_ds.model import build_denoiser
    from maskdit_ds.model.export import export

    torch.manual_seed(seed)
    cfg = ModelConfig(name=name, input_size=size, in_channels=channels, num_classes=classes)
    net = build_denoiser(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    return export(folder, net, cfg, {"step": 7})


