"""The phases of tools/gpu_check.sh: one machine with GPUs (or, with --smoke, a CPU with tiny sizes) checked end
to end, each phase writing <out>/phase_<name>.json as it finishes and each benchmark runner
<out>/runner_<name>.json as it finishes; `report` joins them into gpu_check.json and gpu_check.md.

  python tools/gpu_check.py env --out gpu_check_out [--smoke]
  python tools/gpu_check.py report --out gpu_check_out
Phases, in order of value (tools/gpu_check_plan.py): env, collectives, attention, bench_eager, bench_compiled,
bench_other, gemm, trainer, sampling, vae. Nothing is downloaded: every model, VAE and Inception network is built
from a config with random weights; the data are generated images.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(TOOLS))

import gpu_check_plan  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from maskdit_ds import dist, hardware  # noqa: E402
from maskdit_ds.timing import time_calls  # noqa: E402

# Sizes: the (XL/2 at 256 px, batch 128) on GPUs; tiny ones for the CPU smoke run in the test suite.
FULL = dict(gpu_check_plan.FULL, gemm=8192, trainer_model="MaskDiT-B/2", trainer_res=32, trainer_steps=20,
            stop_at=6, vae_res=256, vae_images=256)
SMOKE = dict(gpu_check_plan.SMOKE, gemm=256, trainer_model="MaskDiT-T/2", trainer_res=16, trainer_steps=6,
             stop_at=2, vae_res=32, vae_images=8)
TINY_VAE = dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1, norm_num_groups=32, sample_size=32)


def sizes(args) -> dict:
    return SMOKE if args.smoke else FULL


def python_env() -> dict:
    """The environment for child processes: this checkout first on the path, one thread per CPU rank."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1" if not torch.cuda.is_available() else "8")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run(cmd: list[str], log: Path, timeout: float | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    log.write_text(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}; last lines:\n{proc.stdout[-1500:]}")
    return proc


# ---------------------------------------------------------------- phases


def phase_env(args) -> dict:
    from importlib import metadata

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cpus": os.cpu_count(), "nvcc": shutil.which("nvcc"), "packages": {}}
    for name in ("deepspeed", "diffusers", "datasets", "safetensors", "transformers"):
        try:
            out["packages"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out["packages"][name] = None
    if out["nvcc"]:
        out["nvcc_version"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip()
        out["nvcc_version"] = out["nvcc_version"].splitlines()[-1] if out["nvcc_version"] else None
    if torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        out["capability"] = list(torch.cuda.get_device_capability())
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True).stdout.strip().splitlines()
            out["driver_and_memory"] = q
    else:
        out["gpus"], out["cpu_capability"] = [], torch.backends.cpu.get_cpu_capability()
    out["auto_precision"] = list(hardware.resolve_precision("auto"))
    out["inductor_cache_dir"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # shared by every process of the check
    out["sampling_precision"] = hardware.sampling_precision("auto")
    return out


def phase_collectives(args) -> dict:
    """Every dist.py collective on the real process group (NCCL on GPUs) with world size 1."""
    device = dist.init_process_group(always=True)
    probes = {
        "all_reduce": lambda: dist.all_reduce(torch.arange(4, dtype=torch.float64)).tolist() == [0, 1, 2, 3],
        "all_reduce_of_device_tensor": lambda: float(dist.all_reduce(torch.ones(3, device=device)).sum()) == 3.0,
        "all_reduce_async": lambda: dist.all_reduce_async(torch.ones(2, device=device)).result().sum().item() == 2,
        "any_rank": lambda: dist.any_rank(True) and not dist.any_rank(False),
        "all_gather_objects": lambda: dist.all_gather_objects({"x": 1}) == [{"x": 1}],
        "gather_to_main": lambda: dist.gather_to_main(np.zeros(3)) is not None,
        "broadcast_from_main": lambda: dist.broadcast_from_main("ok") == "ok",
        "barrier": lambda: dist.barrier() is None,
        "long_barrier": lambda: dist.long_barrier() is None,
    }
    results = {}
    for name, probe in probes.items():
        try:
            results[name] = "ok" if probe() else "wrong result"
        except Exception as err:  # report every probe, not only the first failure
            results[name] = f"{type(err).__name__}: {err}"
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.destroy_process_group()
    failed = [k for k, v in results.items() if v != "ok"]
    if failed:
        raise RuntimeError(f"collectives failed under {backend}: {failed}: {results}")
    return {"backend": backend, "probes": results}


def phase_attention(args) -> dict:
    """Flash attention on the model's own q/k/v layout (strided views of one qkv projection), fp16 and bf16."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from maskdit_ds.model.layers import Attention

    device = dist.device()
    s = sizes(args)
    tokens, width, heads = (s["latent"] // 2) ** 2, 1152 if not args.smoke else 64, 16 if not args.smoke else 4
    out = {}
    for name in ("fp16", "bf16"):
        dtype = hardware.DTYPES[name]
        attn = Attention(width, heads).to(device, dtype)
        x = torch.randn(s["batch"], tokens, width, device=device, dtype=dtype)
        n, t, d = x.shape
        with torch.no_grad():
            qkv = attn.qkv(x).reshape(n, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # as Attention.forward
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                flash = torch.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
            with sdpa_kernel([SDPBackend.MATH]):
                ref = torch.nn.functional.scaled_dot_product_attention(qkv[0].float(), qkv[1].float(),
                                                                         qkv[2].float())
            out[name] = {"flash": "ok", "max_abs_diff_vs_fp32_math": float((flash.float() - ref).abs().max())}
        except RuntimeError as err:
            out[name] = {"flash": f"not taken: {str(err).splitlines()[0]}"}
    if device.type == "cuda" and any(v["flash"] != "ok" for v in out.values()):
        raise RuntimeError(f"flash attention not taken on the model's q/k/v layout: {out}")
    return out


def phase_gemm(args) -> dict:
    """Dense matmul rates against the data sheet: bf16, fp16, fp32 with TF32, plain fp32."""
    n, device = sizes(args)["gemm"], dist.device()
    out = {}
    for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("fp16", torch.float16, False),
                              ("tf32", torch.float32, True), ("fp32", torch.float32, False)):
        if device.type == "cpu" and name == "tf32":
            continue
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        seconds = timed(lambda: a @ b, device, repeats=10)
        measured = 2 * n**3 / seconds / 1e12
        peak = hardware.gpu_peak_tflops("fp32" if name == "tf32" else name, tf32)[0] if device.type == "cuda" else 0
        out[name] = {"tflops": measured, "datasheet_peak": peak or None,
                     "share_of_peak": measured / peak if peak else None}
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def timed(fn, device, repeats: int) -> float:
    """Median seconds per call, after one warm-up call (timing.time_calls synchronises around each call)."""
    return statistics.median(time_calls(fn, repeats + 1)[1:])


def plan_runners(args, phase: str) -> list[dict]:
    """The phase's runners with their predictions: from <out>/plan.json (written by gpu_check.sh while the first
    phases run; the memory traces take a few seconds each), else the plan without memory predictions."""
    path = Path(args.out) / "plan.json"
    for _ in range(120):  # the background plan is normally done long before the bench phases
        if path.is_file():
            break
        time.sleep(0.5)
    if path.is_file():
        phases = json.loads(path.read_text())["phases"]
    else:
        phases = gpu_check_plan.to_json(gpu_check_plan.build_plan(args.smoke, float("inf"), None, memory=False))
    return next((p["runners"] for p in phases if p["name"] == phase), [])


def run_runner(args, runner: dict) -> dict:
    """One benchmark runner in a fresh process (nothing else in its memory) under its own limit; its record is
    saved before the next runner starts, so a later out-of-memory or timeout cannot take it away."""
    s, out = sizes(args), Path(args.out)
    rows_file = out / f"bench_{runner['name']}.json"
    cmd = [sys.executable, "-m", "maskdit_ds", "bench", "--model", s["model"], "--input-size", str(s["latent"]),
           "--channels", "4", "--batch", str(s["batch"]), "--precision", runner["precision"],
           "--compile", "on" if runner["compile"] else "off", "--ratios", ",".join(map(str, s["ratios"])),
           "--rounds", str(gpu_check_plan.ROUNDS), "--steps", str(gpu_check_plan.STEPS),
           "--warmup", str(gpu_check_plan.WARMUP), "--json", str(rows_file)]
    if runner["engine"] == "torch":
        cmd.append("--no-deepspeed")
    record, start = {**runner, "status": "ok"}, time.time()
    try:
        run(cmd, out / f"bench_{runner['name']}.log", timeout=runner["limit_s"] or None)
        rows = json.loads(rows_file.read_text())
        record.update(rows=rows, measured_peak_gib=max(r["peak_mem_gb"] for r in rows))
    except subprocess.TimeoutExpired:
        record.update(status="timeout", error=f"over its {runner['limit_s']} s limit")
    except Exception as err:  # an out-of-memory shows here: record it, the next runner still runs
        record.update(status="failed", error=f"{type(err).__name__}: {err}")
    record["seconds"] = time.time() - start
    (out / f"runner_{runner['name']}.json").write_text(json.dumps(record, indent=2, default=str))
    print(f"[gpu_check] runner {runner['name']}: {record['status']} in {record['seconds']:.0f} s "
          f"(predicted {runner['predicted_s']:.0f} s, {runner['predicted_gib']} GiB)", flush=True)
    return record


def bench_phase(name: str):
    def phase(args) -> dict:
        records = [run_runner(args, runner) for runner in plan_runners(args, name)]
        failed = [r["name"] for r in records if r["status"] != "ok"]
        if failed:
            raise RuntimeError(f"runners {failed} did not finish; see runner_*.json")
        return {"runners": [r["name"] for r in records]}
    phase.__doc__ = f"python -m maskdit_ds bench, one process per runner of the plan's {name} phase."
    return phase


def runner_step(records: dict, runner: str, ratio: float) -> float | None:
    rows = (records.get(runner) or {}).get("rows") or []
    return next((r["median_step_s"] for r in rows if r["mask_ratio"] == ratio), None)


def bench_summary(records: dict, precision: str) -> dict:
    """The figures the targets are stated in, from the runners of one precision: masked MFU, masked/unmasked step
    time, compiled/eager speed-up, DeepSpeed engine/plain-PyTorch step time."""
    eager, compiled, plain = (f"deepspeed-{precision}-eager", f"deepspeed-{precision}-compiled",
                              f"torch-{precision}-eager")
    best = compiled if runner_step(records, compiled, 0.5) else eager
    rows = {r["mask_ratio"]: r for r in (records.get(best) or {}).get("rows") or []}
    out = {"runner": best}
    if 0.5 in rows and 0.0 in rows:
        out.update(masked_mfu=rows[0.5]["mfu"], masked_images_per_s=rows[0.5]["images_per_s"],
                   masked_over_unmasked_step=rows[0.5]["median_step_s"] / rows[0.0]["median_step_s"])
    if runner_step(records, eager, 0.5) and runner_step(records, compiled, 0.5):
        out["compiled_speedup_masked"] = runner_step(records, eager, 0.5) / runner_step(records, compiled, 0.5)
    if runner_step(records, eager, 0.5) and runner_step(records, plain, 0.5):
        out["engine_over_plain_masked"] = runner_step(records, eager, 0.5) / runner_step(records, plain, 0.5)
    return out


def write_images(root: Path, n: int, resolution: int, classes: int = 4) -> None:
    from bench_data import make_images

    make_images(str(root), n, resolution, classes)


def phase_trainer(args) -> dict:
    """The real trainer on one device: a generated image folder, gradient accumulation 2, logging, grids, an
    in-training FID (random-weight Inception), a checkpoint, SIGUSR1 -> exit 75, and the resume to the end."""
    from maskdit_ds.evaluation.weights import write_random_weights

    s, work = sizes(args), Path(args.out) / "trainer"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_images(work / "images", 64, s["trainer_res"])
    ref = work / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (32, s["trainer_res"], s["trainer_res"], 3),
                                                          dtype=np.uint8))
    weights = work / "inception.pth"
    sha = write_random_weights(weights, seed=0)
    steps, precision = s["trainer_steps"], "amp_fp16" if torch.cuda.is_available() else "fp32"  # the ImageNet presets' masked phase
    cmd = [sys.executable, "-m", "maskdit_ds", "train", "--config", "digits", f"run.out_dir={work}", "run.name=run",
           "data.source=images", f"data.path={work / 'images'}", f"data.resolution={s['trainer_res']}",
           "data.num_workers=2", f"model.name={s['trainer_model']}", f"model.input_size={s['trainer_res']}",
           "model.in_channels=3", "model.num_classes=4", f"engine.precision={precision}",
           "engine.compile=false", "train.stages=[]",
           f"train.steps={steps}", "train.global_batch=16", "train.micro_batch=8", "train.log_every=2",
           f"train.ckpt_every={steps // 2}", f"train.grid_every={steps // 2}", "train.ema_decay=0.9",
           "sample.steps=4", "sample.grid_size=4", f"eval.fid_every={steps // 2}", "eval.fid_samples=16",
           f"eval.fid_ref={ref}", f"eval.inception_weights={weights}", f"eval.inception_sha256={sha}"]
    stopped_run(cmd, work / "run" / "stats.jsonl", s["stop_at"], work / "first.log")
    stopped = int((work / "first.log").read_text().split("saved step ")[1].split(",")[0])
    second = run(cmd, work / "second.log", timeout=600)
    rows = [json.loads(line) for line in (work / "run" / "stats.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in rows if "loss" in r]
    fids = [r for r in rows if "fid" in r]
    if logged != list(range(2, steps + 1, 2)) or not fids or "[resume] from" not in second.stdout:
        raise RuntimeError(f"trainer: logged steps {logged}, fids {fids}; see {work}/second.log")
    events = list((work / "run" / "tb").glob("events.out.tfevents.*"))
    last = rows[-1] if "loss" in rows[-1] else rows[-2]
    return {"first_exit": 75, "stopped_at_step": stopped, "logged_steps": logged,
            "fid": [(r["step"], r["fid"]) for r in fids], "tensorboard_files": len(events),
            "images_per_s": last["images_per_s"], "mfu": last["mfu"], "peak_mem_gb": last["peak_mem_gb"],
            "precision": precision, "grad_accum": 2}


def logged_steps(stats: Path) -> list[int]:
    steps = []
    for line in stats.read_text().splitlines() if stats.is_file() else []:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue  # a line being written
    return steps


def stopped_run(cmd: list[str], stats: Path, stop_at: int, log: Path) -> int:
    """Start the trainer, SIGUSR1 it once `stop_at` steps are logged (what SLURM's --signal does), expect 75."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=python_env(), stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if max(logged_steps(stats), default=0) >= stop_at:
                proc.send_signal(signal.SIGUSR1)
                break
            time.sleep(0.2)
        code = proc.wait(timeout=600)
    if code != 75:
        raise RuntimeError(f"trainer: expected exit 75 after SIGUSR1, got {code}; see {log}")
    return code


def random_export(folder: Path, model: str, latent: int) -> Path:
    """A random-weight export of `model` (non-zero output layer, so guidance does real work)."""
    from maskdit_ds.model.export import export
    from maskdit_ds.config import ModelConfig
    from maskdit_ds.model import build_denoiser

    cfg = ModelConfig(name=model, input_size=latent, in_channels=4, num_classes=1000)
    net = build_denoiser(cfg, device=dist.device())  # initialised where it runs, not on the CPU
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return export(folder, net, cfg, {"step": 0, "note": "random weights for tools/gpu_check.py"})


def random_vae(folder: Path, smoke: bool) -> Path:
    """An SD KL-f8 AutoencoderKL with random weights, built from its config (tiny for the smoke run)."""
    from diffusers import AutoencoderKL

    from maskdit_ds.data.vae import SD_KL_F8_CONFIG

    config = {k: v for k, v in SD_KL_F8_CONFIG.items() if not k.startswith("_")}
    if smoke:
        config.update(TINY_VAE)
    AutoencoderKL(**config).save_pretrained(folder)
    return folder


def phase_sampling(args) -> dict:
    """python -m maskdit_ds sample on a random-weight export with guidance and a random SD VAE decoder, per
    precision."""
    s, work = sizes(args), Path(args.out) / "sampling"
    shutil.rmtree(work, ignore_errors=True)
    model = random_export(work / "model", s["model"], s["latent"])
    vae = random_vae(work / "vae", args.smoke)
    out = {}
    for precision in ("bf16", "fp16", "fp32") if torch.cuda.is_available() else ("fp32",):
        n = s["sample_images"] // (2 if precision == "fp32" and not args.smoke else 1)
        dest = work / precision
        run([sys.executable, "-m", "maskdit_ds", "sample", str(model), "--out", str(dest), "--vae", str(vae),
             "--num-images", str(n), "--steps", str(s["sample_steps"]), "--guidance", "1.5", "--precision",
             precision, "--batch-size", "64", "--grid", "0", "--no-progress"], work / f"{precision}.log")
        report = json.loads((dest / "samples.json").read_text())
        ips = report["this_invocation"]["images_per_s"]
        calls = 2 * s["sample_steps"] - 1
        # 50k images with the paper's 40 Heun steps (79 calls) on one GPU, scaled from the calls measured here
        out[precision] = {"images": n, "steps": s["sample_steps"], "images_per_s": ips,
                          "gpu_minutes_for_50k_at_40_steps": 50_000 / (ips * calls / 79) / 60 if ips else None}
    return out


def phase_vae(args) -> dict:
    """tools/bench_data.py: SD VAE encode throughput (random weights) and the latent-cache loader."""
    s, work = sizes(args), Path(args.out) / "vae"
    shutil.rmtree(work, ignore_errors=True)
    vae = random_vae(work / "vae", args.smoke)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    proc = run([sys.executable, "tools/bench_data.py", "--vae", str(vae), "--resolution", str(s["vae_res"]),
                "--device", device, "--vae-dtype", "fp16" if device == "cuda" else "fp32", "--images",
                str(s["vae_images"]), "--batch-size", "32", "--num-workers", "4" if device == "cuda" else "1",
                "--loader-batch", str(min(256, s["vae_images"])), "--loader-batches", "10"], work / "bench_data.log")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the report

TARGETS = (  # (name, figure, test) from the GPU issue
    ("masked MFU >= 45%", lambda b: b.get("masked_mfu"), lambda v: v >= 0.45),
    ("compiled >= 1.15x eager", lambda b: b.get("compiled_speedup_masked"), lambda v: v >= 1.15),
    ("masked/unmasked step time <= 0.55", lambda b: b.get("masked_over_unmasked_step"), lambda v: v <= 0.55),
    ("engine/plain step time <= 1.10", lambda b: b.get("engine_over_plain_masked"), lambda v: v <= 1.10),
)


def report(out: Path) -> dict:
    phases = {path.stem[len("phase_"):]: json.loads(path.read_text()) for path in sorted(out.glob("phase_*.json"))}
    runners = {path.stem[len("runner_"):]: json.loads(path.read_text())
               for path in sorted(out.glob("runner_*.json"))}
    targets = {}
    for precision in sorted({r["precision"] for r in runners.values()}):
        bench = bench_summary(runners, precision)
        for name, figure, ok in TARGETS:
            value = figure(bench)
            targets[f"{precision}: {name}"] = {"value": value, "met": None if value is None else bool(ok(value))}
    for precision, sample in (phases.get("sampling", {}).get("result") or {}).items():
        minutes = sample.get("gpu_minutes_for_50k_at_40_steps")
        targets[f"{precision} sampling: 50k images <= 80 GPU-minutes"] = {
            "value": minutes, "met": None if minutes is None else minutes <= 80}
    plan = json.loads((out / "plan.json").read_text()) if (out / "plan.json").is_file() else None
    result = {"plan": plan, "phases": phases, "runners": runners, "targets": targets}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    env = result["phases"].get("env", {}).get("result") or {}
    predicted = {p["name"]: p["predicted_s"] for p in (result["plan"] or {}).get("phases", [])}
    lines = [f"# gpu_check: {', '.join(env.get('gpus') or ['CPU'])}", "",
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, nvcc {env.get('nvcc_version') or 'absent'}, "
             f"DeepSpeed {(env.get('packages') or {}).get('deepspeed')}", "",
             "| phase | status | seconds | predicted s | notes |", "|---|---|---|---|---|"]
    for name, phase in result["phases"].items():
        note = " ".join((phase.get("error") or "").split())[:200].replace("|", "/")
        guess = predicted.get(name)
        lines.append(f"| {name} | {phase['status']} | {phase.get('seconds', 0):.0f} | "
                     f"{'n/a' if guess is None else f'{guess:.0f}'} | {note} |")
    lines += ["", "| runner | status | seconds | predicted s | peak GiB | predicted GiB |", "|---|---|---|---|---|---|"]
    for name, r in result["runners"].items():
        peak = r.get("measured_peak_gib")
        lines.append(f"| {name} | {r['status']} | {r['seconds']:.0f} | {r['predicted_s']:.0f} | "
                     f"{'n/a' if peak is None else f'{peak:.2f}'} | {r.get('predicted_gib')} |")
    lines += ["", "| target | value | met |", "|---|---|---|"]
    for name, t in result["targets"].items():
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"| {name} | {value} | {t['met']} |")
    return "\n".join(lines) + "\n"


PHASES = {"env": phase_env, "collectives": phase_collectives, "attention": phase_attention,
          "bench_eager": bench_phase("bench_eager"), "bench_compiled": bench_phase("bench_compiled"),
          "bench_other": bench_phase("bench_other"), "gemm": phase_gemm, "trainer": phase_trainer,
          "sampling": phase_sampling, "vae": phase_vae}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=[*PHASES, "report"])
    p.add_argument("--out", default="gpu_check_out")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (the CPU run of the test suite)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.phase == "report":
        result = report(out)
        print((out / "gpu_check.md").read_text(), flush=True)
        ok = all(ph["status"] in ("ok", "skipped") for ph in result["phases"].values())
        return 0 if ok and all(r["status"] == "ok" for r in result["runners"].values()) else 1
    start, record = time.time(), {"status": "ok"}
    try:
        record["result"] = PHASES[args.phase](args)
    except Exception as err:  # the phase failed: record why and go on to the next phase
        record.update(status="failed", error=f"{type(err).__name__}: {err}")
    record["seconds"] = time.time() - start
    (out / f"phase_{args.phase}.json").write_text(json.dumps(record, indent=2, default=str))
    print(f"[gpu_check] {args.phase}: {record['status']} in {record['seconds']:.0f} s"
          + (f" ({record['error'][:300]})" if "error" in record else ""), flush=True)
    return 0 if record["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
