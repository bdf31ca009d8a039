"""The only module that imports deepspeed: ZeRO-2 engine creation, steps, checkpoint save/load, consolidation."""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import warnings
from pathlib import Path

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.constants import default_pg_timeout

from .. import dist
from ..config import Config, ds_config_path, grad_accum
from ..errors import ConfigError, TrainingError
from ..hardware import TRAINING_MODES, keep_freed_host_memory
from ..optimizers import OPTIMIZERS
from ..model.checkpointing import checkpoint_blocks

# DeepSpeed 0.19's ZeRO calls torch's old collective names; torch warns on every rank at the first step. Harmless.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.* is deprecated", category=FutureWarning)

# Hyperparameters live in the run config; a ds_config JSON that sets them would be a second source of truth.
RUN_CONFIG_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                   "optimizer", "scheduler", "gradient_clipping")

# torch reads it at each torch.load: set, every load is weights_only (safe_loads)
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def init_distributed(timeout_s: float | None = None) -> None:
    """gloo on CPU, nccl on GPU; srun tasks get RANK etc. from SLURM's variables. timeout_s (dist.timeout_s)
    bounds the rendezvous and every collective of the group (None: DeepSpeed's default, DEEPSPEED_TIMEOUT minutes)."""
    dist.env_from_slurm()
    dist.ensure_single_process_env()
    if dist.set_device().type == "cpu":
        skip_cpu_shm_op()
        keep_freed_host_memory()
    timeout = default_pg_timeout if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    with dist.joining(timeout.total_seconds()):
        deepspeed.init_distributed(verbose=False, timeout=timeout)
    dist.watch_peers(timeout.total_seconds())
    dist.on_close(release_deepspeed_groups)


def release_deepspeed_groups() -> None:
    """DeepSpeed keeps a clone of the world group (deepspeed.utils.groups); destroying torch's groups leaves that
    clone, and its gloo threads, alive until the interpreter's teardown. Its own teardown routine lets go of it
    (what deepspeed.comm.destroy_process_group does after destroying the groups; no collective)."""
    from deepspeed.utils import groups

    groups._release_process_group_references()


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
    precision, json_precision = cfg.engine.precision, ds_precision(ds)
    if json_precision != precision:
        raise ConfigError(f"engine.precision is {precision} but {path} enables {json_precision}")
    unknown = sorted(set(ds.get(AMP_SCALER_KEY, {})) - set(AMP_SCALER_DEFAULTS))
    if unknown or (AMP_SCALER_KEY in ds and precision != "amp_fp16"):
        raise ConfigError(f"engine.ds_config: {path} section {AMP_SCALER_KEY} " + (
            f"has unknown keys {unknown} (known: {sorted(AMP_SCALER_DEFAULTS)})" if unknown
            else f"applies to amp_fp16 only, not {precision}"))
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


AUTOCAST_DTYPES = {"float16": "amp_fp16", "fp16": "amp_fp16", "half": "amp_fp16", "bfloat16": "amp_bf16",
                   "bf16": "amp_bf16"}  # DeepSpeed's torch_autocast.dtype spellings -> engine.precision


def ds_precision(ds: dict) -> str:
    """The engine.precision that a DeepSpeed config's precision sections amount to."""
    enabled = [k for k in ("fp16", "bf16", "torch_autocast") if ds.get(k, {}).get("enabled")]
    if len(enabled) > 1:
        return " and ".join(enabled)  # never equal to a precision: refused by the caller
    if enabled == ["torch_autocast"]:
        dtype = str(ds["torch_autocast"].get("dtype"))
        return AUTOCAST_DTYPES.get(dtype, f"torch_autocast with dtype {dtype}")
    return enabled[0] if enabled else "fp32"


def optimizer_impl(choice: str) -> str:
    """auto: torch's fused AdamW, on GPUs and CPUs alike (torch >= 2.4 has a CPU kernel). On ZeRO-2's one flat
    partition per group the unfused kernel makes full-size temporaries (sqrt, div, ...) every step: measured on
    CPU, the fused kernel took the engine's step from 1.45x to 1.23x the plain step's (docs/benchmarks.md)."""
    return "torch_fused" if choice == "auto" else choice


def compile_enabled(choice: str) -> bool:
    """auto: compile on GPUs (inductor's CPU build costs more than it saves on short CPU runs)."""
    return torch.cuda.is_available() if choice == "auto" else choice == "true"


# amp_fp16's loss scaler: torch's GradScaler with these settings, from the ds_config's "amp_grad_scaler" section
# (engine mechanics, like DeepSpeed's "fp16" section; removed before DeepSpeed sees the config). torch's defaults,
# which the paper's training used, plus a floor: GradScaler has none, DeepSpeed's fp16 scaler stops at
# min_loss_scale 1, and below it an overflow is not a too-high scale but a diverged network.
AMP_SCALER_KEY = "amp_grad_scaler"
AMP_SCALER_DEFAULTS = {"init_scale": 2.0**16, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                       "min_scale": 1.0}


class LossScaleExhausted(TrainingError):
    """An fp16 step overflowed at the minimum loss scale: the network itself produces non-finite values."""


class Engine:
    """Wraps a DeepSpeedEngine: call it like the network, then backward(loss) and step() every micro-batch."""

    def __init__(self, net: torch.nn.Module, cfg: Config, world_size: int, load_universal: bool = False):
        self.precision, self.mode = cfg.engine.precision, TRAINING_MODES[cfg.engine.precision]
        if self.mode.matmul == "fp32" and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = cfg.engine.tf32
            torch.backends.cudnn.allow_tf32 = cfg.engine.tf32
        if self.precision == "fp16" and not get_accelerator().is_fp16_supported():
            raise ConfigError(f"engine.precision=fp16 is not supported on this {get_accelerator().device_name()} "
                              "device (DeepSpeed needs native fp16 arithmetic); use auto, amp_fp16, bf16 or fp32")
        self.config = build_ds_config(cfg, world_size)
        scaler_settings = self.config.pop(AMP_SCALER_KEY, {})  # ours, not DeepSpeed's
        if load_universal:  # a checkpoint saved with another world size, converted by reshard.py
            self.config["checkpoint"] = {**self.config.get("checkpoint", {}), "load_universal": True}
        if cfg.engine.activation_checkpointing:  # before compiling: the compiled blocks then checkpoint
            checkpoint_blocks(net)
        if compile_enabled(cfg.engine.compile):
            compile_blocks(net)
        params = [p for p in net.parameters() if p.requires_grad]
        self.ds, _, _, _ = deepspeed.initialize(model=net, model_parameters=params, config=self.config)
        # amp_fp16: torch's GradScaler inside DeepSpeed's ZeRO optimizer (None in every other mode), replaced by
        # one with the ds_config's settings before its first use (DeepSpeed builds it with torch's defaults)
        self.scaler, self.min_loss_scale = None, AMP_SCALER_DEFAULTS["min_scale"]
        if getattr(self.ds.optimizer, "torch_autocast_gradscaler", None) is not None:
            settings = {**AMP_SCALER_DEFAULTS, **scaler_settings}
            self.min_loss_scale = settings.pop("min_scale")
            self.scaler = torch.amp.GradScaler(get_accelerator().device_name(), **settings)
            self.ds.optimizer.torch_autocast_gradscaler = self.scaler
        self._no = torch.zeros((), device=dist.device())  # divergence flags without host-to-device copies

    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        """DeepSpeed's step (the optimizer runs on the last micro-batch of the accumulation). An fp16 overflow
        skips the update on every rank (the gradient norm that detects it is global); at the minimum loss scale
        it raises LossScaleExhausted instead."""
        skipped = self.ds.skipped_steps
        try:
            self.ds.step()
        except Exception as err:  # DeepSpeed's DynamicLossScaler raises a bare Exception at its minimum
            if "loss scale already at minimum" not in str(err):
                raise
            raise LossScaleExhausted(f"fp16 overflow at the minimum loss scale {self.loss_scale:g}") from None
        if self.scaler is not None and self.ds.skipped_steps > skipped:
            self._back_off_scaler()

    def _back_off_scaler(self) -> None:
        """amp_fp16 under ZeRO-2: DeepSpeed 0.19 skips an overflowing step before torch's GradScaler sees it, so
        the scaler never lowers its scale (every later step would overflow too). Lower it as GradScaler.update
        does after a found inf (x backoff_factor, growth tracker reset). The host read of the scale happens on
        overflow steps only."""
        scaler = self.scaler
        if scaler.get_scale() <= self.min_loss_scale:
            raise LossScaleExhausted(f"fp16 overflow at the minimum loss scale {self.min_loss_scale:g}")
        found_inf = torch.ones(1, device=scaler._scale.device)
        torch._amp_update_scale_(scaler._scale, scaler._growth_tracker, found_inf, scaler.get_growth_factor(),
                                 scaler.get_backoff_factor(), scaler.get_growth_interval())

    @property
    def skipped_steps(self) -> int:
        return int(self.ds.skipped_steps)

    def divergence(self, nonfinite_losses: torch.Tensor, skipped: bool) -> torch.Tensor:
        """A 0-dim device tensor > 0 when the step just taken diverged: a non-finite loss or global gradient norm,
        except on a step that fp16 loss scaling skipped as an overflow (not divergence: the scale was lowered,
        and at the minimum scale step() raised). No host synchronisation: DeepSpeed's norm stays on the device."""
        if skipped and self.mode.loss_scaling:
            return self._no
        bad = nonfinite_losses.float()
        norm = self.ds.get_global_grad_norm()
        if norm is None:
            return bad
        if not torch.is_tensor(norm):  # DeepSpeed's float("inf") of an overflow step
            return bad + (0.0 if math.isfinite(norm) else 1.0)
        return bad + (~torch.isfinite(norm)).float().to(bad.device)

    def weights_finite(self) -> torch.Tensor:
        """0-dim device flag, 1 when this rank's fp32 master partitions and module weights are all finite."""
        tensors = [*(self.master_partitions() or []), *(p.detach() for p in self.ds.module.parameters())]
        return torch.stack([torch.isfinite(t).all() for t in tensors]).all().float()

    @property
    def loss_scale(self) -> float:
        """The current fp16 loss scale (1 without loss scaling). A host read: for log lines, not every step."""
        if self.scaler is not None:
            return float(self.scaler.get_scale())
        scaler = getattr(self.ds.optimizer, "loss_scaler", None)
        return float(scaler.cur_scale) if scaler is not None and self.mode.loss_scaling else 1.0

    # ------------------------------------------------------------ the fp32 masters, for the EMA

    def master_partitions(self) -> list[torch.Tensor] | None:
        """This rank's fp32 master weights: ZeRO-2's flat (partition_size,) partition per parameter group, updated
        in place by every step; None when the optimizer keeps no partitions."""
        return getattr(self.ds.optimizer, "single_partition_of_fp32_groups", None)

    def partition_layout(self) -> list[dict[str, tuple[int, torch.Size]]]:
        """Per parameter group: module parameter name -> (offset, shape) in the group's flat buffer. The buffer is
        world x partition_size long (padded); rank r's master partition covers [r * size, (r + 1) * size)."""
        opt = self.ds.optimizer
        names = {id(p): name for name, p in self.ds.module.named_parameters()}
        layout = []
        for flat, params in zip(opt.bit16_groups_flat, opt.bit16_groups):  # each param is a view into `flat`
            base, itemsize = flat.data_ptr(), flat.element_size()
            layout.append({names[id(p)]: ((p.data_ptr() - base) // itemsize, p.shape) for p in params})
        return layout

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def save(self, ckpt_dir: Path, tag: str) -> None:
        """Collective: every rank writes its ZeRO partition (rank-0-only saving would hang). amp_fp16's GradScaler
        rides along as client state: DeepSpeed saves only its own loss scaler."""
        self.ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state=self.client_state())

    def client_state(self) -> dict:
        return {"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load(self, ckpt_dir: Path, tag: str) -> None:
        with safe_loads():  # DeepSpeed's own files: weights_only, DeepSpeed's types only
            path, client = self.ds.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir}/{tag}")
        if self.scaler is not None and (client or {}).get("grad_scaler"):
            self.scaler.load_state_dict(client["grad_scaler"])  # scale and growth tracker, exactly

    def full_fp32_state(self) -> dict:
        """Collective: the consolidated fp32 master weights (module names), e.g. to hand over to the next stage."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.ds.module.named_parameters():
            full = safe_get_full_fp32_param(p) if p.requires_grad else None
            out[name] = (full if full is not None else p.detach()).float().cpu().clone()
        return out

    def release(self) -> None:
        """Free the engine's buffers (before the next stage builds a new one) and its hold on the process group;
        once is enough, a second call does nothing."""
        if getattr(self, "ds", None) is None:
            return
        self.ds.destroy()
        self.ds = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# Where the engine's step time goes, for torch.profiler: DeepSpeed's ZeRO-2 phases (method of
# DeepSpeedZeroOptimizer -> label). The hooks' total includes the bucket reductions they trigger when a bucket fills.
ZERO2_PHASES = {
    "reduce_independent_p_g_buckets_and_remove_grads": "zero2: gradient hooks (copy into the bucket)",
    "independent_gradient_partition_epilogue": "zero2: end of backward (reduce the last bucket)",
    "average_tensor": "zero2: bucket reduce-scatter / all-reduce",
    "copy_grads_in_partition": "zero2: copy reduced gradients into the partition",
    "scaled_global_norm": "zero2: global gradient norm",
    "_optimizer_step": "zero2: optimizer kernel",
    "step": "zero2: optimizer step (all of it)",
}


@contextlib.contextmanager
def profiled_phases():
    """Inside, every ZeRO-2 phase of ZERO2_PHASES runs under a torch.profiler label (record_function), so a
    profile of engine steps says where the time beside the network goes. Patches the class, restores it after."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    saved = {name: getattr(DeepSpeedZeroOptimizer, name) for name in ZERO2_PHASES}

    def labelled(method, label):
        def run(*args, **kwargs):
            with torch.profiler.record_function(label):
                return method(*args, **kwargs)
        return run

    try:
        for name, label in ZERO2_PHASES.items():
            setattr(DeepSpeedZeroOptimizer, name, labelled(saved[name], label))
        yield
    finally:
        for name, method in saved.items():
            setattr(DeepSpeedZeroOptimizer, name, method)


def compile_blocks(net: torch.nn.Module, backend: str = "inductor") -> None:
    """torch.compile each transformer block in place ("regional" compilation): blocks of one width share one
    compiled graph, so a 28-block trunk compiles about as fast as one block, and the state-dict keys stay as they
    are (no `_orig_mod.` prefix). A new kept-token count (a mask-ratio schedule) recompiles once, after which
    dynamo marks the token dimension dynamic instead of recompiling at every ratio."""
    from ..model import trunk_blocks

    if next(net.parameters()).device.type == "cpu":
        avoid_inductor_avx2_vectorization()
    for block in trunk_blocks(net):
        block.compile(backend=backend)


def avoid_inductor_avx2_vectorization() -> None:
    """torch 2.13's inductor AVX2 vector code turns a training forward of our DiTBlock into NaNs (seen with
    ATEN_CPU_CAPABILITY=avx2 on an EPYC; AVX-512 code and scalar code are exact), so on an AVX2 CPU compile
    scalar code (simdlen 1). GPUs and AVX-512 CPUs are untouched."""
    from torch._inductor import config as inductor_config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    if str(pick_vec_isa()) == "avx2" and inductor_config.cpp.simdlen is None:
        inductor_config.cpp.simdlen = 1
        dist.say("[engine] torch.compile on an AVX2 CPU: inductor's AVX2 vector code gives NaNs for these "
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
