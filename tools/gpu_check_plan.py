"""What tools/gpu_check.sh runs, in order of value, with predicted memory and time, trimmed to a time budget.

A lent GPU comes rarely and for minutes, so the check asks the deciding questions first: does the machine work
(env, collectives, attention), then MaskDiT-XL/2 step time, MFU and memory in the default GPU precision, eager
(masked 0.5 and unmasked), then compiled, then the other precision and the plain-PyTorch baseline, then the
trainer, sampling and the VAE. Every benchmark runner is its own process, so nothing else sits in its memory.

Memory per runner: training/memory_plan.py (ZeRO-2 state plus a fake-tensor trace of the step). Times: the
formulas below with the stated assumptions; the check records every phase's and runner's seconds beside the
prediction, so the next session replaces the assumptions with measurements. A phase's limit is
SAFETY x its prediction plus one process start; phases that do not fit the budget are dropped, lowest value
first; at run time a phase whose prediction no longer fits what is left of the budget is skipped.

  python tools/gpu_check_plan.py [--budget 480] [--device-memory 80GB] [--smoke] [--json plan.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_BUDGET_S = 480  # 8 minutes: what is left of a 15-minute lease after the machine's start and set-up
REHEARSAL_GPU = "H100"  # hardware.GPU_PEAKS key of the GPU the rehearsal plans for (SXM5, 80 GB)

# Predictions, not measurements: each is replaced by what a lent GPU records (gpu_check.json: "seconds" beside
# "predicted_s" for every phase and runner).
ASSUMED = {
    "process_start_s": 20.0,  # a fresh python: torch + deepspeed imports, CUDA context
    "engine_init_s": 10.0,  # XL/2 materialised on the GPU + deepspeed.initialize (flat buffers, optimizer)
    "mfu_eager": 0.35,  # share of the data-sheet dense peak an eager step reaches
    "mfu_compiled": 0.45,  # the target for a compiled step
    "compile_s_per_graph": 0.0,  # set below from the CPU measurement and the stated GPU factor
    "light_phase_s": 5.0,  # env, collectives, attention, gemm: their work after the process start
    "trainer_launch_s": 30.0,  # one trainer launch of MaskDiT-B/2 at 32 px: data, grids, FID, checkpoint
    "sampling_setup_s": 15.0,  # random XL/2 export and VAE written, loaded, decoder run
    "vae_s": 30.0,  # build and save an SD-VAE, write images, encode them
}
# Measured: `python tools/time_compile.py --model MaskDiT-XL/2 --input-size 32 --batch 2` on EPYC-BF16 (2 cores,
# cold inductor cache, 2026-12-06): 30.6 s for the trunk's 3 graphs (forward + backward), 10.2 s per graph, no
# graph break. The GPU builds Triton kernels instead of C++ and benchmarks their launch configurations on first
# use; the Python half (dynamo, AOT autograd, lowering) is the same work. Without a GPU measurement we assume 3x
# the CPU's time per graph, a margin on top of SAFETY for the deciding compiled phase.
MEASURED_CPU_COMPILE_S_PER_GRAPH = 10.2
GPU_COMPILE_FACTOR = 3.0
ASSUMED["compile_s_per_graph"] = round(MEASURED_CPU_COMPILE_S_PER_GRAPH * GPU_COMPILE_FACTOR, 1)
SAFETY = 1.5  # limit = SAFETY x predicted + one process start
SMOKE_LIMIT_S = 300  # --smoke: the least limit per phase and runner (CPU times, other jobs on the machine)
WARMUP, ROUNDS, STEPS = 2, 3, 3  # bench steps per mask ratio: warm-up (also the memory pass) + rounds x steps

FULL = dict(model="MaskDiT-XL/2", latent=32, batch=128, default_precision="amp_bf16", other_precision="amp_fp16",
            ratios=(0.5, 0.0), sample_images=128, sample_steps=18, sample_precisions=3)
SMOKE = dict(model="MaskDiT-T/2", latent=8, batch=4, default_precision="fp32", other_precision=None,
             ratios=(0.5, 0.0), sample_images=4, sample_steps=2, sample_precisions=1)


@dataclass
class Runner:
    """One benchmark process: an engine, a precision, eager or compiled, every mask ratio of the plan."""

    name: str
    engine: str  # deepspeed | torch
    precision: str
    compile: bool
    predicted_gib: float | None = None
    predicted_s: float = 0.0
    limit_s: int = 0
    fits: bool | None = None


@dataclass
class Phase:
    name: str
    value: str  # what it tells us
    predicted_s: float = 0.0
    limit_s: int = 0
    runners: list = field(default_factory=list)
    kept: bool = True


def step_seconds(sizes: dict, ratio: float, precision: str, compiled: bool) -> float:
    """Predicted GPU step time from the trunk's FLOPs at an assumed share of the data-sheet peak."""
    from maskdit_ds.hardware import GPU_PEAKS, TRAINING_MODES
    from maskdit_ds.model import get_size, kept_tokens, train_flops

    size = get_size(sizes["model"])
    kept = kept_tokens("random", sizes["latent"] // size.patch_size, ratio)
    matmul = TRAINING_MODES[precision].matmul
    peak = dict(GPU_PEAKS)[REHEARSAL_GPU]["tf32" if matmul == "fp32" else matmul]
    mfu = ASSUMED["mfu_compiled" if compiled else "mfu_eager"]
    return train_flops(size, sizes["latent"], 4, kept) * sizes["batch"] / (peak * 1e12 * mfu)


def runner_seconds(sizes: dict, runner: Runner) -> float:
    steps = sum((WARMUP + ROUNDS * STEPS) * step_seconds(sizes, r, runner.precision, runner.compile)
                for r in sizes["ratios"])
    # the encoder's blocks once per kept-token count, the decoder's once (it always sees every token): measured
    graphs = len(sizes["ratios"]) + 1 if runner.compile else 0
    return ASSUMED["process_start_s"] + ASSUMED["engine_init_s"] + graphs * ASSUMED["compile_s_per_graph"] + steps


def limit(predicted: float) -> int:
    return int(SAFETY * predicted + ASSUMED["process_start_s"] + 0.5)


def bench_runners(sizes: dict) -> dict[str, list[Runner]]:
    default, other = sizes["default_precision"], sizes["other_precision"]
    phases = {"bench_eager": [Runner(f"deepspeed-{default}-eager", "deepspeed", default, False)],
              "bench_compiled": [Runner(f"deepspeed-{default}-compiled", "deepspeed", default, True)],
              "bench_other": [Runner(f"torch-{default}-eager", "torch", default, False)]}
    if other:
        phases["bench_other"].insert(0, Runner(f"deepspeed-{other}-eager", "deepspeed", other, False))
    return phases


def predict_memory(sizes: dict, runners: list[Runner], device_memory: int | None) -> None:
    """Fill predicted_gib and fits for every runner; one trace per distinct (engine, precision width)."""
    from maskdit_ds.config import ModelConfig
    from maskdit_ds.training.bench import bench_config
    from maskdit_ds.training.engine import build_ds_config
    from maskdit_ds.training.memory_plan import FIT_SHARE, GiB, bench_runner_peak

    model = ModelConfig(name=sizes["model"], input_size=sizes["latent"], in_channels=4, num_classes=1000)
    cache = {}
    for runner in runners:
        key = (runner.engine, runner.precision)
        if key not in cache:
            cfg = bench_config(sizes["model"], sizes["latent"], 4, sizes["batch"], runner.precision)
            cache[key] = bench_runner_peak(model, sizes["batch"], runner.precision, sizes["ratios"], "random",
                                           runner.engine, build_ds_config(cfg, 1))["peak"]
        runner.predicted_gib = round(cache[key] / GiB, 3)
        runner.fits = None if device_memory is None else cache[key] <= FIT_SHARE * device_memory


def build_plan(smoke: bool, budget: float, device_memory: int | None, memory: bool = True) -> list[Phase]:
    sizes = SMOKE if smoke else FULL
    light = ASSUMED["process_start_s"] + ASSUMED["light_phase_s"]
    phases = [Phase("env", "versions, GPUs, auto precision", light),
              Phase("collectives", "every dist.py collective under NCCL", light),
              Phase("attention", "flash attention on the model's q/k/v layout", light)]
    runners = bench_runners(sizes)
    values = {"bench_eager": "XL/2 step time, images/s, MFU, peak memory, masked vs unmasked (eager)",
              "bench_compiled": "the same compiled: compile time and speed-up",
              "bench_other": "the other precision, and the plain-PyTorch baseline (engine/plain ratio)"}
    for name, group in runners.items():
        if smoke and name == "bench_compiled":
            continue  # inductor's CPU build takes minutes; the smoke run checks the plumbing
        for r in group:
            r.predicted_s = runner_seconds(sizes, r)
            r.limit_s = limit(r.predicted_s)
        phases.append(Phase(name, values[name], sum(r.predicted_s for r in group), runners=group))
    calls = 2 * sizes["sample_steps"] - 1
    sample_s = sizes["sample_precisions"] * (ASSUMED["process_start_s"] + ASSUMED["sampling_setup_s"] + calls *
                                             step_seconds({**sizes, "batch": 2 * sizes["sample_images"]}, 0.0,
                                                          "bf16", False) / 3)  # guided: 2x batch; forward 1/3
    phases += [Phase("gemm", "dense matmul rates against the data sheet", light),
               Phase("trainer", "checkpoint, SIGUSR1 -> 75, resume, grids, in-training FID",
                     2 * (ASSUMED["process_start_s"] + ASSUMED["trainer_launch_s"])),
               Phase("sampling", "XL/2 sampling throughput per precision", sample_s),
               Phase("vae", "SD-VAE encode throughput and the latent loader",
                     ASSUMED["process_start_s"] + ASSUMED["vae_s"])]
    for phase in phases:
        if smoke:  # a shared CPU runs the smoke test: its times say nothing about a GPU, only the plumbing counts
            for r in phase.runners:
                r.limit_s = max(r.limit_s, SMOKE_LIMIT_S)
        phase.limit_s = sum(r.limit_s for r in phase.runners) if phase.runners else limit(phase.predicted_s)
        if smoke:
            phase.limit_s = max(phase.limit_s, SMOKE_LIMIT_S)
    if memory:
        predict_memory(sizes, [r for p in phases for r in p.runners], device_memory)
    used = 0.0
    for phase in phases:  # value order: the first phase that does not fit drops itself and all after it
        used += phase.predicted_s
        phase.kept = used <= budget
    return phases


DECIDING = ("env", "collectives", "attention", "bench_eager", "bench_compiled")  # a plan without these fails


def problems(phases: list[Phase], budget: float) -> list[str]:
    out = [f"runner {r.name} is predicted to need {r.predicted_gib} GiB, more than the device allows"
           for p in phases for r in p.runners if r.fits is False]
    out += [f"phase {p.name} does not fit the {budget:.0f} s budget" for p in phases
            if p.name in DECIDING and not p.kept]
    kept = sum(p.predicted_s for p in phases if p.kept)
    if kept > budget:
        out.append(f"the kept phases need {kept:.0f} s, more than the {budget:.0f} s budget")
    return out


def markdown(phases: list[Phase], budget: float, device_memory: int | None) -> str:
    from maskdit_ds.training.memory_plan import FIT_SHARE, GiB

    memory = f"{device_memory / GiB:.0f} GiB" if device_memory else "no device memory given"
    lines = [f"gpu_check plan: budget {budget:.0f} s, {REHEARSAL_GPU} ({memory}; a runner fits at "
             f"<= {FIT_SHARE:.0%}), phases in order of value", "",
             "| # | phase | runs | predicted s | limit s | runner | predicted peak GiB | fits |",
             "|---|---|---|---|---|---|---|---|"]
    for i, p in enumerate(phases, 1):
        runs = "yes" if p.kept else "dropped (budget)"
        if not p.runners:
            lines.append(f"| {i} | {p.name} | {runs} | {p.predicted_s:.0f} | {p.limit_s} | - | - | - |")
        for r in p.runners:
            fits = {True: "yes", False: "NO", None: "n/a"}[r.fits]
            lines.append(f"| {i} | {p.name} | {runs} | {r.predicted_s:.0f} | {r.limit_s} | {r.name} | "
                         f"{r.predicted_gib} | {fits} |")
    kept = sum(p.predicted_s for p in phases if p.kept)
    lines += ["", f"predicted total of the kept phases: {kept:.0f} s of {budget:.0f} s",
              "assumed (until a GPU measures them): " + ", ".join(f"{k} {v}" for k, v in ASSUMED.items()),
              f"compile_s_per_graph: {MEASURED_CPU_COMPILE_S_PER_GRAPH} s per graph measured on CPU "
              f"(tools/time_compile.py, XL/2 trunk, cold cache) x {GPU_COMPILE_FACTOR} assumed for the GPU",
              f"limits: {SAFETY} x predicted + process start; step times: trunk FLOPs at the assumed MFU of the "
              f"{REHEARSAL_GPU} data-sheet dense peak; memory: training/memory_plan.py"]
    return "\n".join(lines)


def to_json(phases: list[Phase]) -> list[dict]:
    return [asdict(p) for p in phases]


def main(argv=None) -> int:
    from maskdit_ds.training.memory_plan import parse_memory

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=None, help=f"seconds (default {DEFAULT_BUDGET_S}; smoke: none)")
    p.add_argument("--device-memory", default="80GB", help="per GPU, for the fit verdicts (smoke: none)")
    p.add_argument("--smoke", action="store_true", help="the CPU smoke run's plan (tiny sizes, no fit checks)")
    p.add_argument("--json", help="write the plan here (gpu_check.py's phases read their runners from it)")
    p.add_argument("--tsv", action="store_true", help="print 'phase limit predicted' per kept phase (for the shell)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory predictions (the shell's fast pass)")
    args = p.parse_args(argv)
    budget = args.budget if args.budget is not None else (float("inf") if args.smoke else DEFAULT_BUDGET_S)
    memory = None if args.smoke else parse_memory(args.device_memory)
    phases = build_plan(args.smoke, budget, memory, memory=not args.no_memory)
    if args.json:
        Path(args.json).write_text(json.dumps({"budget_s": budget, "phases": to_json(phases)}, indent=2))
    if args.tsv:
        for phase in phases:
            if phase.kept:
                print(phase.name, phase.limit_s, round(phase.predicted_s))
        return 0
    print(markdown(phases, budget, memory))
    found = problems(phases, budget)
    for problem in found:
        print(f"rehearsal: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
