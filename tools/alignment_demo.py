"""The CPU demonstration of representation alignment (docs/alignment.md): four arms on the built-in digits at equal
training compute, several seeds each, quality (digit class agreement) against device-hours.

Arms (each: a first stage that holds 80% of the compute budget, then unmasked tuning at half the learning rate
for the other 20%, as MaskDiT's recipe; alignment, where on, only in the first stage):
  unmasked           no masking
  masked-0.5         random masks, ratio 0.5
  masked-0.5+align   the same with REPA's term (lambda 0.5) against a digits teacher
  block-0.75+align   MaskDM's 2x2-token block masks at ratio 0.75, aligned

Equal compute: every arm gets the FLOPs of `--budget-steps` unmasked steps, counted analytically per image:
the denoiser's training FLOPs at the kept-token count, plus for aligned steps the teacher's forward and the
projector's forward and backward (maskdit_ds.model.flops; 2 x parameters x tokens for the teacher and projector).
The teacher is trained first by tools/train_digits_teacher.py (and reused when its folder exists). Finished runs
are skipped, so an interrupted demonstration continues where it stopped.

  python tools/alignment_demo.py --out runs/alignment_demo                  # 4 arms x 3 seeds, about 30 min
  python tools/alignment_demo.py --out /tmp/demo --seeds 0 --budget-steps 60  # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import maskdit_ds  # noqa: F401 (is the package importable?)
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from maskdit_ds.config import load_config  # noqa: E402
from maskdit_ds.dist import free_port  # noqa: E402
from maskdit_ds.model import get_size, kept_tokens, token_grid, train_flops  # noqa: E402

# name -> (first-stage mask ratio, strategy, aligned)
ARMS = {"unmasked": (0.0, "random", False), "masked-0.5": (0.5, "random", False),
        "masked-0.5+align": (0.5, "random", True), "block-0.75+align": (0.75, "block", True)}
ALIGN = {"loss.align_depth": 2, "loss.align_proj_dim": 256, "loss.align_teacher_resolution": 8}  # see the docs
FIRST_SHARE, TUNING_LR = 0.8, 5.0e-4


def teacher_cost(teacher_dir: Path) -> tuple[float, int]:
    """(forward FLOPs per image of the teacher: 2 x parameters x (patch tokens + [CLS]), its feature width)."""
    from safetensors.torch import load_file

    config = json.loads((teacher_dir / "config.json").read_text())
    params = sum(t.numel() for t in load_file(str(teacher_dir / "model.safetensors")).values())
    return 2.0 * params * ((config["image_size"] // config["patch_size"]) ** 2 + 1), config["hidden_size"]


def step_flops(cfg, ratio: float, strategy: str, aligned: bool, teacher: tuple[float, int]) -> tuple[float, int]:
    """(training FLOPs per image of one step, kept tokens) for the digits model; teacher: teacher_cost()."""
    m = cfg.model
    size = get_size(m.name)
    kept = kept_tokens(strategy, token_grid(m), ratio)
    flops = train_flops(size, m.input_size, m.in_channels, kept if ratio > 0 else None)
    if aligned:
        (forward, features), width = teacher, ALIGN["loss.align_proj_dim"]
        projector = size.hidden_size * width + width * width + width * features  # its weights
        flops += forward + 6.0 * projector * kept  # teacher forward; projector forward + backward
    return flops, kept


def plan(budget_steps: int, teacher: tuple[float, int]) -> dict:
    """Steps per stage for every arm so that each spends the FLOPs of budget_steps unmasked steps."""
    cfg = load_config("digits")
    unmasked, _ = step_flops(cfg, 0.0, "random", False, teacher)
    budget = budget_steps * unmasked
    tuning_steps = round(budget * (1 - FIRST_SHARE) / unmasked)
    arms = {}
    for name, (ratio, strategy, aligned) in ARMS.items():
        per_step, kept = step_flops(cfg, ratio, strategy, aligned, teacher)
        first = round(budget * FIRST_SHARE / per_step)
        arms[name] = {"ratio": ratio, "strategy": strategy, "aligned": aligned, "kept_tokens": kept,
                      "first_stage_steps": first, "tuning_steps": tuning_steps,
                      "gflops_per_image_first_stage": per_step / 1e9,
                      "total_tflops": (first * per_step + tuning_steps * unmasked) * cfg.train.global_batch / 1e12}
    return arms


def overrides(name: str, arm: dict, seed: int, teacher_dir: Path, out: Path, evals: int) -> list[str]:
    first = {"mask.ratio": arm["ratio"], "mask.strategy": arm["strategy"], "mask.block_size": 2,
             "loss.align_weight": 0.5 if arm["aligned"] else 0.0}
    tuning = {"mask.ratio": 0.0, "optim.lr": TUNING_LR, "loss.align_weight": 0.0}
    stages = [{"name": "first", "steps": arm["first_stage_steps"], "overrides": first},
              {"name": "tuning", "steps": arm["tuning_steps"], "overrides": tuning}]
    total = arm["first_stage_steps"] + arm["tuning_steps"]
    items = [f"run.out_dir={out}", f"run.name={name}_s{seed}", f"run.seed={seed}", "engine.precision=fp32",
             f"train.stages={json.dumps(stages)}", f"eval.agreement_every={max(1, total // evals)}",
             "eval.agreement_samples=200", "train.grid_every=0", f"train.ckpt_every={total}",
             "train.log_every=25", "sample.final_samples=400"]
    if arm["aligned"]:
        items += [f"loss.align_teacher={teacher_dir}", *(f"{k}={v}" for k, v in ALIGN.items())]
    return items


def launch(items: list[str], ranks: int, log: Path) -> None:
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", "maskdit_ds",
           "train", "--config", "digits", *items]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    import torch

    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    with open(log, "w") as f:
        code = subprocess.call(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"training failed (exit {code}); see {log}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/alignment_demo")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget-steps", type=int, default=600, help="compute budget, in unmasked steps of 128 images")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--evals", type=int, default=10, help="agreement checks per run")
    p.add_argument("--arms", default=",".join(ARMS))
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    teacher_dir = out / "teacher"
    if not (teacher_dir / "model.safetensors").is_file():
        subprocess.check_call([sys.executable, str(ROOT / "tools" / "train_digits_teacher.py"), "--out",
                               str(teacher_dir)], cwd=ROOT)
    arms = plan(args.budget_steps, teacher_cost(teacher_dir))
    (out / "plan.json").write_text(json.dumps({"budget_unmasked_steps": args.budget_steps, "arms": arms}, indent=2))
    print(json.dumps(arms, indent=2), flush=True)
    labels = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in args.arms.split(","):
            run = out / f"{name}_s{seed}"
            labels.append(f"{name}={run}")
            if (run / "samples.json").is_file():
                print(f"[demo] {run.name}: done earlier", flush=True)
                continue
            print(f"[demo] {run.name}: training", flush=True)
            launch(overrides(name, arms[name], seed, teacher_dir, out, args.evals), args.ranks, out / f"{run.name}.log")
    from maskdit_ds.evaluation.report import report

    png, md, text = report(labels, out, "digits_class_agreement")
    finals = {lab: json.loads((Path(lab.split("=", 1)[1]) / "samples.json").read_text()) for lab in labels}
    (out / "final_samples.json").write_text(json.dumps(finals, indent=2))
    print(text)
    print(f"wrote {png}, {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
