"""The only module that imports deepspeed: ZeRO-2 engine creation, steps, checkpoint save/load, consolidation."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import warnings
from pathlib import Path

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.constants import default_pg_timeout

from .. import dist
from ..config import Config, ds_config_path, grad_accum
from ..errors import ConfigError

# DeepSpeed 0.19's ZeRO calls torch's old collective names; torch warns on every rank at the first step. Harmless.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.* is deprecated", category=FutureWarning)

# Hyperparameters live in the run config; a ds_config JSON that sets them would be a second source of truth.
RUN_CONFIG_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                   "optimizer", "scheduler", "gradient_clipping")


def init_distributed(timeout_s: float | None = None) -> None:
    """gloo on CPU, nccl on GPU; srun tasks get RANK etc. from SLURM's variables. timeout_s (dist.timeout_s)
    bounds the rendezvous and every collective of the group (None: DeepSpeed's default, DEEPSPEED_TIMEOUT minutes)."""
    dist.env_from_slurm()
    dist.ensure_single_process_env()
    if dist.set_device().type == "cpu":
        skip_cpu_shm_op()
    timeout = default_pg_timeout if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    with dist.joining(timeout.total_seconds()):
        deepspeed.init_distributed(verbose=False, timeout=timeout)
    dist.watch_peers(timeout.total_seconds())


def skip_cpu_shm_op() -> None:
    """On the CPU accelerator DeepSpeed compiles its shared-memory all-reduce op with g++ at every process-group
    start (30-65 s on a fresh host, silently). Only tensor-parallel inference (inference_all_reduce) uses it, and
    DeepSpeed runs without it when the build returns None, so training skips the build."""
    import importlib

    comm = importlib.import_module("deepspeed.comm.torch")  # sys.modules' entry: deepspeed.comm.torch is shadowed
    if getattr(comm, "build_shm_op", None) is not None:
        comm.build_shm_op = lambda: None


def build_ds_config(cfg: Config, world_size: int) -> dict:
    path = ds_config_path(cfg)
    ds = json.loads(Path(path).read_text())
    found = [k for k in RUN_CONFIG_KEYS if k in ds]
    if found:
        raise ConfigError(f"engine.ds_config: {path} sets {', '.join(found)}; batch sizes, optimizer, lr and "
                          f"clipping come from the run config (train.*, optim.*), so remove them from the JSON")
    precision = cfg.engine.precision
    json_precision = "fp16" if ds.get("fp16", {}).get("enabled") else "bf16" if ds.get("bf16", {}).get("enabled") \
        else "fp32"
    if json_precision != precision:
        raise ConfigError(f"engine.precision is {precision} but {path} enables {json_precision}")
    opt = cfg.optim
    ds.update(
        train_batch_size=cfg.train.global_batch,
        train_micro_batch_size_per_gpu=cfg.train.micro_batch,
        gradient_accumulation_steps=grad_accum(cfg, world_size),
        gradient_clipping=0.0,  # docs/method.md §4: no clipping
        optimizer={"type": "AdamW", "params": {
            "lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay,
            **OPTIMIZERS[optimizer_impl(cfg.engine.optimizer)]}},
    )
    return ds


# engine.optimizer -> DeepSpeed's AdamW parameters. torch's AdamW (ZeRO-supported, so no untested-optimizer
# switch) needs no build; DeepSpeed's FusedAdam JIT-compiles CUDA code on first use (nvcc + ninja on every node,
# 1-2 minutes per fresh node).
OPTIMIZERS = {
    "torch_fused": {"torch_adam": True, "fused": True},  # one fused kernel per step (CUDA; also CPU in torch 2.4+)
    "torch": {"torch_adam": True},  # torch's foreach implementation
    "deepspeed_fused": {},  # DeepSpeed FusedAdam (JIT build)
}


def optimizer_impl(choice: str) -> str:
    """auto: torch's fused AdamW on GPUs, its foreach AdamW on CPUs."""
    if choice == "auto":
        return "torch_fused" if torch.cuda.is_available() else "torch"
    return choice


def compile_enabled(choice: str) -> bool:
    """auto: compile on GPUs (inductor's CPU build costs more than it saves on short CPU runs)."""
    return torch.cuda.is_available() if choice == "auto" else choice == "true"


class Engine:
    """Wraps a DeepSpeedEngine: call it like the network, then backward(loss) and step() every micro-batch."""

    def __init__(self, net: torch.nn.Module, cfg: Config, world_size: int, load_universal: bool = False):
        if cfg.engine.precision == "fp32" and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = cfg.engine.tf32
            torch.backends.cudnn.allow_tf32 = cfg.engine.tf32
        if cfg.engine.precision == "fp16" and not get_accelerator().is_fp16_supported():
            raise ConfigError(f"engine.precision=fp16 is not supported on this {get_accelerator().device_name()} "
                              "device (DeepSpeed needs native fp16 arithmetic); use auto, bf16 or fp32")
        self.config = build_ds_config(cfg, world_size)
        if load_universal:  # a checkpoint saved with another world size, converted by reshard.py
            self.config["checkpoint"] = {**self.config.get("checkpoint", {}), "load_universal": True}
        if compile_enabled(cfg.engine.compile):
            compile_blocks(net)
        params = [p for p in net.parameters() if p.requires_grad]
        self.ds, _, _, _ = deepspeed.initialize(model=net, model_parameters=params, config=self.config)
        self.precision = cfg.engine.precision

    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()

    @property
    def skipped_steps(self) -> int:
        return int(self.ds.skipped_steps)

    def grad_norm_finite(self) -> torch.Tensor | None:
        """1.0 where the last step's global gradient norm was not finite (0-dim, on device, no host sync);
        None when DeepSpeed did not compute one."""
        norm = self.ds.get_global_grad_norm()
        if norm is None:
            return None
        norm = torch.as_tensor(norm, dtype=torch.float32, device=dist.device())
        return (~torch.isfinite(norm)).float()

    @property
    def loss_scale(self) -> float:
        scaler = getattr(self.ds.optimizer, "loss_scaler", None)
        return float(scaler.cur_scale) if scaler is not None and self.precision == "fp16" else 1.0

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def save(self, ckpt_dir: Path, tag: str) -> None:
        """Collective: every rank writes its ZeRO partition (rank-0-only saving would hang)."""
        self.ds.save_checkpoint(str(ckpt_dir), tag=tag)

    def load(self, ckpt_dir: Path, tag: str) -> None:
        with safe_loads():  # DeepSpeed's own files: weights_only, DeepSpeed's types only
            path, _ = self.ds.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir}/{tag}")

    def full_fp32_state(self) -> dict:
        """Collective: the consolidated fp32 master weights (module names), e.g. to hand over to the next stage."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.ds.module.named_parameters():
            full = safe_get_full_fp32_param(p) if p.requires_grad else None
            out[name] = (full if full is not None else p.detach()).float().cpu().clone()
        return out

    def release(self) -> None:
        """Free the engine's buffers before the next stage builds a new one."""
        self.ds.destroy() if hasattr(self.ds, "destroy") else None
        del self.ds
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def compile_blocks(net: torch.nn.Module) -> None:
    """torch.compile each transformer block in place ("regional" compilation): blocks of one width share one
    compiled graph, so a 28-block trunk compiles about as fast as one block, and the state-dict keys stay as they
    are (no `_orig_mod.` prefix). A new kept-token count (a mask-ratio schedule) recompiles once, after which
    dynamo marks the token dimension dynamic instead of recompiling at every ratio."""
    from ..model import trunk_blocks

    if next(net.parameters()).device.type == "cpu":
        avoid_inductor_avx2_vectorization()
    for block in trunk_blocks(net):
        block.compile()


def avoid_inductor_avx2_vectorization() -> None:
    """torch 2.13's inductor AVX2 vector code turns a training forward of our DiTBlock into NaNs (seen with
    ATEN_CPU_CAPABILITY=avx2 on an EPYC; AVX-512 code and scalar code are exact), so on an AVX2 CPU compile
    scalar code (simdlen 1). GPUs and AVX-512 CPUs are untouched."""
    from torch._inductor import config as inductor_config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    if str(pick_vec_isa()) == "avx2" and inductor_config.cpp.simdlen is None:
        inductor_config.cpp.simdlen = 1
        dist.print0("[engine] torch.compile on an AVX2 CPU: inductor's AVX2 vector code gives NaNs for these "
                    "blocks in torch 2.13, so the compiled kernels are scalar")


def consolidated_fp32_state(tag_dir: Path) -> dict:
    """fp32 model weights of a ZeRO checkpoint tag, any world size, without an engine (DeepSpeed's own routine,
    its loads forced to weights_only)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = Path(tag_dir)
    with safe_loads():
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


# ---------------------------------------------------------------- loading DeepSpeed's files without running code


def deepspeed_safe_globals() -> list:
    """The only non-tensor types DeepSpeed 0.19's ZeRO-2 checkpoints hold (fp16/bf16/fp32, found by loading
    every file of real tags with weights_only=True). Unpickling them builds plain objects; it calls no code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def safe_loads():
    """Every torch.load inside, DeepSpeed's own included (it passes weights_only=False), runs as weights_only=True
    with only deepspeed_safe_globals() allowed: a tampered checkpoint fails to load instead of running code.
    (torch reads TORCH_FORCE_WEIGHTS_ONLY_LOAD at each call.)"""
    saved = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        if saved is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = saved


FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def unsafe_file(tag_dir: Path) -> str | None:
    """Why a tag's pickled files (.pt) would not load under safe_loads(), or None. mmap: only the pickled
    structure is read and checked, not the tensor bytes, so this is cheap even for XL/2 optimizer states."""
    tag_dir = Path(tag_dir)
    for path in sorted(tag_dir.rglob("*.pt")):
        try:
            with safe_loads():
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # UnpicklingError, RuntimeError (not a zip file), ...: all mean "do not load"
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return f"{path.relative_to(tag_dir)} is refused by the safe loader ({first[:160]})"
    return None


def universal_conversion_main(argv: list[str]) -> None:
    """`python -c` entry of reshard.to_universal: DeepSpeed's ds_to_universal with its loads made safe."""
    import runpy
    import sys

    sys.argv = ["ds_to_universal", *argv]
    with safe_loads():  # the environment variable is inherited by any worker process it starts
        runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__")
