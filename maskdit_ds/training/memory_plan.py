"""A memory plan before every launch: what one device holds for each stage of a run, and whether it fits.

Per device, in the stage's precision (docs/launch.md, "Memory plan"):
- engine state, counted from DeepSpeed 0.19's ZeRO-2 (runtime/zero/stage_1_and_2.py): the full model in the
  training dtype, the gradient partition (N / world, training dtype) plus two reduce buckets (overlap_comm),
  the fp32 master partition and AdamW's two fp32 moments (12 bytes x N / world), and at the optimizer step the
  fp32 gradient partition (4 bytes x N / world), which lives after the activations are gone;
- activations of one micro-batch, from tracing one real training step (loss forward and backward, the stage's
  mask) with fake tensors on the CPU (FakeTensorMode: shapes and dtypes, no memory, a few seconds for XL/2).
  Every storage an operator creates is counted while it is alive; parameter gradients are dropped once
  accumulated, as ZeRO-2 copies them into its buckets (counted above). Attention is the fused kernel's
  (torch's CPU flash attention, which stores the output and log-sum-exp, never a T x T matrix, as the GPU's
  flash kernel does). test_memory_plan.py checks the trace against a measured real CPU step.

A stage fits when its peak is at most FIT_SHARE of the device: the rest is the CUDA context, NCCL's buffers and
the caching allocator's fragmentation, which the trace does not see.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..config import Config, expand_stages
from ..diffusion import MaskedEDMLoss
from ..hardware import DTYPES, TRAINING_MODES
from ..model import Masker, build_denoiser, get_size, token_grid
from ..model.checkpointing import checkpoint_blocks

FIT_SHARE = 0.9  # of the device's memory a plan may use (the rest: CUDA context, NCCL, fragmentation)
GiB = 2**30


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside and still alive, and their peak. Storages are told apart by
    their C++ object (fake tensors share no data pointers) and forgotten when Python frees them."""

    def __init__(self, existing=()):
        """existing: tensors made before (parameters, inputs), whose views are not new memory."""
        super().__init__()
        self.live: dict[int, int] = {}
        self.existing = {t.untyped_storage()._cdata for t in existing}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t.untyped_storage())
        return out

    def track(self, storage) -> None:
        key = storage._cdata
        if key in self.live or key in self.existing:  # a view of a storage already counted
            return
        self.live[key] = storage.nbytes()
        self.now += self.live[key]
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self.free, key)

    def free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)


@dataclass
class ActivationTrace:
    saved: int  # bytes alive after the forward (what the backward needs), per micro-batch
    peak: int  # the most alive at once during forward and backward, per micro-batch


def step_inputs(model_cfg, batch: int):
    x = torch.randn(batch, model_cfg.in_channels, model_cfg.input_size, model_cfg.input_size)  # (N, C, H, W)
    y = torch.randint(0, model_cfg.num_classes, (batch,))  # (N,)
    return x, y


def trace_step(model_cfg, micro_batch: int, precision: str, mask_strategy: str, mask_ratio: float,
               block_size: int = 4, checkpointing: bool = False, fake: bool = True,
               autocast: bool = False) -> ActivationTrace:
    """One training step's activation memory: the loss forward and backward of `model_cfg` on a micro-batch,
    the trunk in `precision` as DeepSpeed casts it (autocast=True: fp32 weights and torch.autocast to
    `precision`, as the plain-PyTorch baseline runs; the CPU's autocast op list stands in for the GPU's).
    fake=False runs it for real on the CPU; fake=True costs no memory."""
    size = get_size(model_cfg.name)
    mode = torch._subclasses.fake_tensor.FakeTensorMode() if fake else contextlib.nullcontext()
    cast = torch.autocast("cpu", DTYPES[precision]) if autocast else contextlib.nullcontext()
    with mode, default_dtype(torch.float32 if autocast else DTYPES[precision]):
        net = build_denoiser(model_cfg)  # under fake tensors its init costs nothing
    with mode:
        if checkpointing:
            checkpoint_blocks(net)
        for p in net.parameters():  # ZeRO-2 moves each gradient into its buckets once accumulated
            p.register_post_accumulate_grad_hook(drop_grad)
        x, y = step_inputs(model_cfg, micro_batch)
        loss_fn = MaskedEDMLoss(size.patch_size, model_cfg.num_classes)
        masker = Masker(mask_strategy, token_grid(model_cfg), mask_ratio, block_size)
        with LiveBytes([*net.parameters(), *net.buffers(), x, y]) as live:
            with cast:
                loss, _ = loss_fn(net, x, y, masker)
            saved = live.now
            loss.mean().backward()
    return ActivationTrace(saved=saved, peak=live.peak)


def drop_grad(p: torch.Tensor) -> None:
    p.grad = None


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


@dataclass
class StagePlan:
    """Bytes on one device for one stage."""

    name: str
    precision: str
    micro_batch: int
    kept_tokens: int
    checkpointing: bool
    params: int  # parameter count N
    weights: int  # the full model in the training dtype
    gradients: int  # gradient partition + reduce buckets
    optimizer: int  # fp32 master partition + AdamW moments
    step_grads: int  # fp32 gradient partition at the optimizer step (after the activations are freed)
    activations: int  # peak of one micro-batch's forward and backward

    @property
    def static(self) -> int:
        return self.weights + self.gradients + self.optimizer

    @property
    def peak(self) -> int:
        return self.static + max(self.activations, self.step_grads)


def zero2_state(params: int, precision: str, world: int, ds_config: dict) -> dict:
    """Engine state per device under DeepSpeed ZeRO-2 (see the module docstring for where each term comes from)."""
    zero = ds_config.get("zero_optimization", {})
    width = DTYPES[precision].itemsize
    partition = -(-params // world)  # ceil: DeepSpeed pads the flat buffer to the world size
    buckets = (2 if zero.get("overlap_comm") else 1) * int(zero.get("reduce_bucket_size", 5e8)) * width
    return {"weights": params * width, "gradients": partition * width + min(buckets, params * width),
            "optimizer": 3 * 4 * partition, "step_grads": 4 * partition}


def split_precision(precision: str) -> tuple[str, bool]:
    """engine.precision -> (the dtype DeepSpeed keeps the weights in, whether the forward autocasts): fp16 /
    bf16 / fp32 cast the model; amp_fp16 / amp_bf16 keep fp32 weights and autocast to the half type."""
    mode = TRAINING_MODES[precision]
    return mode.matmul, mode.autocast


def plan_stage(name: str, cfg: Config, world: int, ds_config: dict) -> StagePlan:
    with torch.device("meta"):
        params = sum(p.numel() for p in build_denoiser(cfg.model).parameters() if p.requires_grad)
    precision = cfg.engine.precision
    compute, autocast = split_precision(precision)
    masker = Masker(cfg.mask.strategy, token_grid(cfg.model), cfg.mask.ratio, cfg.mask.block_size)
    checkpointing = bool(getattr(cfg.engine, "activation_checkpointing", False))
    trace = trace_step(cfg.model, cfg.train.micro_batch, compute, cfg.mask.strategy, cfg.mask.ratio,
                       cfg.mask.block_size, checkpointing, autocast=autocast)
    return StagePlan(name, precision, cfg.train.micro_batch, masker.kept, checkpointing, params,
                     activations=trace.peak, **zero2_state(params, "fp32" if autocast else compute, world, ds_config))


def plan_run(cfg: Config, world: int) -> list[StagePlan]:
    """One plan per stage (the run itself when it has no stages). cfg: resolved (no `auto` precision)."""
    from .engine import build_ds_config

    return [plan_stage(stage.name, stage.cfg, world, build_ds_config(stage.cfg, world)) for stage in expand_stages(cfg)]


def parse_memory(text: str) -> int:
    """'80GB', '80GiB', '79.6G', '81920MiB' -> bytes (GB and GiB both read as 2**30: what nvidia-smi and torch
    call 80 GB on an H100 is 80 GiB, 79.6 usable)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([GMT])i?B?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"--device-memory: {text!r} is not a size like 80GB or 81920MiB")
    scale = {"M": 2**20, "G": 2**30, "T": 2**40}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def local_device_memory() -> int | None:
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def fits(plan: StagePlan, device_memory: int) -> bool:
    return plan.peak <= FIT_SHARE * device_memory


def suggestion(plan: StagePlan, device_memory: int, checkpointed: StagePlan | None) -> str:
    """What to change when a stage does not fit: activation checkpointing if that is enough, else a smaller
    micro-batch with gradient accumulation (activations scale with the micro-batch)."""
    budget = FIT_SHARE * device_memory - plan.static
    if checkpointed is not None and fits(checkpointed, device_memory) and not plan.checkpointing:
        return (f"engine.activation_checkpointing=true (activations {gib(checkpointed.activations)} instead of "
                f"{gib(plan.activations)})")
    if budget <= 0:
        return "the engine state alone does not fit: more ranks (ZeRO-2 partitions the optimizer by world size)"
    per_image = max(plan.activations, plan.step_grads) / plan.micro_batch
    micro = max(1, int(budget // per_image))
    return (f"train.micro_batch={micro} or less with gradient accumulation making up train.global_batch "
            f"(activations {gib(plan.activations / plan.micro_batch)} per image)")


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def describe_plan(cfg: Config, world: int, device_memory: int | None) -> tuple[str, bool]:
    """The plan as text, and whether every stage fits (True when no device memory is known)."""
    plans = plan_run(cfg, world)
    lines = [f"memory plan per device (world size {world}, ZeRO-2; activations traced with fake tensors, "
             f"attention as the fused kernel stores it):",
             "| stage | precision | micro-batch | kept tokens | act. ckpt | weights | gradients | optimizer "
             "| activations | peak | fits |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    all_fit = True
    for plan, scfg in zip(plans, [stage.cfg for stage in expand_stages(cfg)]):
        verdict = "n/a"
        if device_memory:
            ok = fits(plan, device_memory)
            all_fit &= ok
            verdict = "yes" if ok else "NO"
        lines.append(f"| {plan.name} | {plan.precision} | {plan.micro_batch} | {plan.kept_tokens} | "
                     f"{'on' if plan.checkpointing else 'off'} | {gib(plan.weights)} | {gib(plan.gradients)} | "
                     f"{gib(plan.optimizer)} | {gib(plan.activations)} | {gib(plan.peak)} | {verdict} |")
        if device_memory and not fits(plan, device_memory):
            checkpointed = None
            if not plan.checkpointing:
                on = dataclasses.replace(scfg, engine=dataclasses.replace(scfg.engine,
                                                                          activation_checkpointing=True))
                checkpointed = plan_stage(plan.name, on, world, zero_config(on, world))
            lines.append(f"  {plan.name} does not fit {gib(device_memory)} x {FIT_SHARE}: try "
                         f"{suggestion(plan, device_memory, checkpointed)}")
    if device_memory:
        lines.append(f"device memory: {gib(device_memory)}; a stage fits when its peak is at most {FIT_SHARE:.0%} "
                     f"of it (the rest: CUDA context, NCCL buffers, allocator fragmentation)")
    if cfg.loss.align_weight:
        lines.append("not counted: the alignment teacher (frozen, half precision) and projector, and their "
                     "activations")
    return "\n".join(lines), all_fit


def zero_config(cfg: Config, world: int) -> dict:
    from .engine import build_ds_config

    return build_ds_config(cfg, world)


def bench_runner_peak(model_cfg, batch: int, precision: str, ratios, strategy: str, engine: str,
                      ds_config: dict) -> dict:
    """Predicted peak bytes of one benchmark runner on one device (tools/gpu_check.py): the worst of its mask
    ratios. engine "deepspeed": ZeRO-2 at world size 1 in `precision`; "torch": the plain baseline (fp32
    weights, gradients and AdamW's two moments, 16 bytes per parameter, and autocast activations)."""
    with torch.device("meta"):
        params = sum(p.numel() for p in build_denoiser(model_cfg).parameters())
    matmul, autocast = split_precision(precision)  # a training mode (amp_bf16, ...) or a plain dtype name
    autocast = autocast or (engine == "torch" and matmul != "fp32")  # the plain loop always autocasts
    activations = max(trace_step(model_cfg, batch, matmul, strategy, r, autocast=autocast).peak for r in ratios)
    if engine == "torch":
        return {"static": 16 * params, "activations": activations, "peak": 16 * params + activations}
    state = zero2_state(params, "fp32" if autocast else matmul, 1, ds_config)
    static = state["weights"] + state["gradients"] + state["optimizer"]
    return {"static": static, "activations": activations, "peak": static + max(activations, state["step_grads"])}
