"""What the machine can do: the one precision -> dtype table, `auto` precision by hardware, and dense peaks for MFU.

Imports only torch (and the timing loop), so config validation, the engine, sampling and metrics can all share it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .timing import time_calls

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("auto", *DTYPES)  # sampling and inference: the network's autocast dtype


@dataclass(frozen=True)
class TrainingMode:
    """What an engine.precision does (docs/method.md §12): the dtype of the module's weights (and so of the
    residual stream, LayerNorm and adaLN), the dtype of the matmuls, and whether the forward runs under
    torch.autocast and the loss is scaled (fp16 only). DeepSpeed's optimizer keeps fp32 masters in every mode."""

    weights: str  # "fp32" | "bf16" | "fp16": the module's parameters
    matmul: str  # the GEMMs' dtype: the rate MFU is measured against
    autocast: bool  # the forward under torch.autocast(matmul): fp32 weights, half matmuls (the paper's AMP)
    loss_scaling: bool  # dynamic loss scaling (DeepSpeed's for pure fp16, torch's GradScaler for amp_fp16)


TRAINING_MODES = {
    "amp_fp16": TrainingMode("fp32", "fp16", autocast=True, loss_scaling=True),  # the paper's masked phase
    "amp_bf16": TrainingMode("fp32", "bf16", autocast=True, loss_scaling=False),
    "fp16": TrainingMode("fp16", "fp16", autocast=False, loss_scaling=True),  # DeepSpeed's pure half engine
    "bf16": TrainingMode("bf16", "bf16", autocast=False, loss_scaling=False),
    "fp32": TrainingMode("fp32", "fp32", autocast=False, loss_scaling=False),
}

# Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets, per device. "tf32" is the fp32 rate when TF32
# tensor cores are allowed; "fp32" is the plain CUDA-core rate. Names are matched against
# torch.cuda.get_device_name() in order, so the more specific entries come first.
GPU_PEAKS = (
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM5 (e.g. "H100 80GB HBM3")
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM, same tensor cores as H100 SXM
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),  # SXM4 and PCIe alike
    ("V100", {"fp16": 125.0, "fp32": 15.7}),  # no bf16 tensor cores, no TF32
)


def describe_mode(name: str) -> str:
    """One line for --dry-run: which dtype each part of a step runs in, the DeepSpeed section that does it, and
    where the EMA comes from (docs/method.md §12)."""
    mode = TRAINING_MODES[name]
    if mode.autocast:
        what = (f"fp32 weights; forward under torch.autocast({mode.matmul}): matmuls in {mode.matmul}, LayerNorm, "
                f"softmax and reductions in fp32; fp32 gradients reduced in fp32 (DeepSpeed section torch_autocast)")
    elif mode.weights != "fp32":
        what = (f"the whole module in {mode.weights}, LayerNorm, adaLN and the residual stream included; fp32 "
                f"masters in the optimizer (DeepSpeed section {mode.weights})")
    else:
        what = "fp32 throughout, TF32 matmuls on GPUs when engine.tf32 (no DeepSpeed precision section)"
    scaling = {"amp_fp16": "; dynamic loss scaling by torch's GradScaler (ds_config section amp_grad_scaler)",
               "fp16": "; DeepSpeed's dynamic loss scaling (ds_config section fp16)"}.get(name, "")
    return f"{name}: {what}{scaling}; EMA of the fp32 masters"


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_host_memory() -> bool:
    """CPU training: keep freed memory in the process for the next step instead of handing it back to the kernel.

    glibc serves every allocation above 32 MB with a fresh mmap and returns it on free, so each step's large
    temporaries (ZeRO-2's flat gradient partition, its buckets, the optimizer's scratch) are page-faulted in and
    zeroed by the kernel again: measured on MaskDiT-S/2 at one rank, that was most of the ZeRO-2 engine's extra
    time over a plain PyTorch step (docs/benchmarks.md, "Engine overhead"). With mmap off and trimming off, freed
    blocks are reused, as a GPU's caching allocator does; resident memory stays at the run's peak. False where
    the C library has no mallopt (not glibc): nothing changes there."""
    import ctypes

    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    # -1: "disables trimming completely" (mallopt(3)); 0 mmapped blocks: big blocks come from the heap too
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))


def native_cpu_bf16() -> tuple[bool, str]:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX-512 BF16 or AMX), as torch will run them.

    torch's own queries: the ISA its kernels dispatch to (ATEN_CPU_CAPABILITY lowers it) and the CPU's bf16
    units. Without them bf16 and fp16 GEMMs are emulated: measured 25x slower than fp32 on an AVX2-only EPYC.
    """
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    units = [name for name, probe in (("AVX-512 BF16", torch.cpu._is_avx512_bf16_supported),
                                      ("AMX", torch.cpu._is_amx_tile_supported)) if probe()]
    if not capability.startswith("AVX512"):
        return False, f"torch's CPU kernels use {capability}, which has no bf16 matrix instructions"
    if not units:
        return False, "the CPU has no AVX-512 BF16 or AMX units"
    return True, f"the CPU has {' and '.join(units)}"


def resolve_precision(requested: str) -> tuple[str, str]:
    """`auto` -> the fastest precision that trains correctly here, with the reason; anything else is kept.
    GPUs get the paper's mixed precision (fp32 weights, autocast matmuls); CPUs a pure engine, since autocast's
    per-forward weight casts cost more there than the fp32 LayerNorms save."""
    if requested != "auto":
        return requested, "set in the config"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        name = torch.cuda.get_device_name()
        if major >= 8:
            return "amp_bf16", f"{name} (compute capability {major}.{minor}) has bf16 tensor cores"
        return "amp_fp16", f"{name} (compute capability {major}.{minor}) has no bf16 tensor cores"
    native, why = native_cpu_bf16()
    return ("bf16", why) if native else ("fp32", f"{why}; emulated bf16/fp16 would be far slower than fp32")


def sampling_precision(choice: str) -> str:
    """auto: bf16 autocast on GPUs that have it (fp16 on older ones), fp32 on CPUs; also the frozen alignment
    teacher's precision. The EDM scalings and the solver state stay fp32/float64 whatever this says; only the
    network's matmuls drop precision."""
    if choice != "auto":
        return choice
    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16"


def half_precision_warning(mode: str) -> str | None:
    """On a CPU without native support for the mode's matmul dtype, the measured cost of asking for it anyway."""
    precision = TRAINING_MODES[mode].matmul
    if precision == "fp32" or torch.cuda.is_available():
        return None
    if precision == "bf16" and native_cpu_bf16()[0]:
        return None
    if precision == "fp16" and torch.cpu._is_amx_fp16_supported():
        return None
    fast, slow = gemm_gflops(torch.float32), gemm_gflops(DTYPES[precision])
    return (f"engine.precision={mode} on a CPU without native {precision} matrix units: {precision} matmuls "
            f"measured {fast / slow:.0f}x slower than fp32 here ({slow:.1f} vs {fast:.1f} GFLOP/s); "
            f"engine.precision=auto picks fp32 on this machine")


def gemm_gflops(dtype: torch.dtype, m: int = 256, k: int = 512, n: int = 512, repeats: int = 3) -> float:
    """Best-of-`repeats` GFLOP/s of one (m x k) @ (k x n) product in `dtype`, after one warm-up, on this
    process's threads. Its own generator: the global RNG must not move (resume replays it)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen).to(dtype), torch.randn(k, n, generator=gen).to(dtype)
    best = min(time_calls(lambda: a @ b, repeats + 1)[1:])  # the first call warms up
    return 2 * m * k * n / best / 1e9


def gpu_peak_tflops(precision: str, tf32: bool) -> tuple[float, str]:
    """Dense peak of this GPU for `precision`, a matmul dtype or a training mode (whose matmul dtype counts);
    fp32 counts TF32 tensor cores only when TF32 is on."""
    name = torch.cuda.get_device_name()
    precision = TRAINING_MODES[precision].matmul if precision in TRAINING_MODES else precision
    key = "tf32" if precision == "fp32" and tf32 else precision
    for pattern, peaks in GPU_PEAKS:
        if pattern in name and key in peaks:
            return peaks[key], f"{name} dense {key} data-sheet peak"
    return 0.0, f"no data-sheet {key} peak known for {name}"


@functools.lru_cache(maxsize=None)
def cpu_peak_tflops(dtype: torch.dtype, shapes: tuple[tuple[int, int, int], ...]) -> tuple[float, str]:
    """The best rate of the model's own GEMM shapes (m, k, n) in the run's dtype on this process's threads:
    what this CPU can do for this model, so the step's achieved rate is a share of it."""
    best = max(gemm_gflops(dtype, m, k, n, repeats=2) for m, k, n in shapes)
    return best / 1e3, f"measured CPU GEMM ({dtype}, {torch.get_num_threads()} threads, the model's shapes)"


def device_peak_tflops(precision: str, tf32: bool, cpu_shapes, configured: float = 0.0) -> tuple[float, str]:
    """Per-device peak for MFU: configured > data sheet (GPU) > measured on the model's shapes (CPU)."""
    if configured > 0:
        return configured, "configured (metrics.peak_tflops)"
    if torch.cuda.is_available():
        return gpu_peak_tflops(precision, tf32)
    matmul = TRAINING_MODES[precision].matmul if precision in TRAINING_MODES else precision
    return cpu_peak_tflops(DTYPES[matmul], tuple(cpu_shapes))
