"""Shared by the checkpoint tests: one real 2-rank fp16 run with two saves (made once per pytest process), a
hostile pickle, and a 1-rank DeepSpeed engine that loads a universal checkpoint in a subprocess."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import launch as _launch

FP16 = _launch.FP16  # this CPU lacks native fp16: DeepSpeed's fp16 path on emulated kernels (test set-up)
RUN_OVERRIDES = ["engine.precision=fp16", "train.steps=2", "train.ckpt_every=1", "metrics.peak_tflops=1"]
_RUN: dict = {}


def trained_run() -> Path:
    """<tmp>/r: 2 ranks, fp16, steps 1 and 2 saved (checkpoints/step_0000001, step_0000002). Reused, read-only:
    tests that modify it work on a copy."""
    if "dir" not in _RUN:
        out = Path(tempfile.mkdtemp(prefix="maskdit_ckpt_"))
        atexit.register(shutil.rmtree, out, ignore_errors=True)  # the run is shared by the tests of this process
        proc = _launch.train(out, "r", RUN_OVERRIDES, ranks=2, **FP16)
        if proc.returncode != 0:
            raise AssertionError(f"2-rank fp16 run failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
        _RUN["dir"], _RUN["log"] = out / "r", proc.stdout
    return _RUN["dir"]


def copy_run(tmp_path: Path) -> Path:
    """A writable copy of trained_run() at tmp_path/r."""
    run = tmp_path / "r"
    shutil.copytree(trained_run(), run)
    return run


class RunsAShellCommand:
    """What a hostile checkpoint carries: unpickling it calls os.system (here: touch a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


UNIVERSAL_LOAD = r"""
import json, sys
from pathlib import Path
import torch, yaml
from deepspeed.utils import safe_get_full_optimizer_state
from maskdit_ds.training import engine as eng
from maskdit_ds.config import from_dict
from maskdit_ds.model import build_denoiser

run_dir, tag = Path(sys.argv[1]), sys.argv[2]
cfg = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
eng.init_distributed()
plain = eng.build_ds_config
eng.build_ds_config = lambda c, w: {**plain(c, w), "checkpoint": {"load_universal": True}}
engine = eng.Engine(build_denoiser(cfg.model), cfg, 1)
engine.load(run_dir / "checkpoints", f"{tag}/universal")
masters = engine.full_fp32_state()
reference = eng.consolidated_fp32_state(run_dir / "checkpoints" / tag)
module = dict(engine.module.named_parameters())
universal = run_dir / "checkpoints" / tag / "universal" / "zero"
moments = all(torch.equal(safe_get_full_optimizer_state(module[k], "exp_avg").float(),
                          torch.load(universal / k / "exp_avg.pt", weights_only=False)["param"].float())
              for k in module)
print("RESULT " + json.dumps({
    "keys_equal": sorted(masters) == sorted(reference),
    "masters_bitwise": all(torch.equal(masters[k], reference[k]) for k in reference),
    "module_dtype": str(next(iter(module.values())).dtype),
    "module_is_rounded_masters": all(torch.equal(p.detach(), reference[k].to(p.dtype)) for k, p in module.items()),
    "exp_avg_loaded": moments,
    "nonzero_exp_avg": any(safe_get_full_optimizer_state(p, "exp_avg").abs().sum().item() > 0
                           for p in module.values()),
    "loss_scale": engine.loss_scale, "global_steps": int(engine.ds.global_steps),
    "world": engine.ds.dp_world_size}))
"""


def load_universal_on_one_rank(run_dir: Path, tag: str, timeout: int = 240) -> dict:
    proc = subprocess.run([sys.executable, "-c", UNIVERSAL_LOAD, str(run_dir), tag], cwd=_launch.ROOT,
                          env=_launch.env(**FP16), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"1-rank universal load failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])
