"""maskdit_ds's precision modes against the paper's plain AMP loop, and the old half-copy EMA against the exact one
(maskdit_ds/training/numerics.py; figures in docs/benchmarks.md). One process, CPU or one GPU.

  python tools/numerics.py compare --steps 300 --out runs/numerics.json        # every mode vs the paper's loop
  python tools/numerics.py compare --arms amp_fp16 --init-scale 1e12 --steps 50  # with fp16 overflows
  python tools/numerics.py ema-deviation --steps 3000 --every 300               # pure bf16: old vs exact EMA

Pure fp16 on a CPU without native fp16 needs DeepSpeed's CPU fp16 switch the tests use:
  MASKDIT_TEST_CPU_FP16=1 PYTHONPATH=tests/support/cpu_fp16 python tools/numerics.py compare --arms fp16
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import maskdit_ds  # noqa: F401 (is the package importable?)
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("compare", "ema-deviation"):
        s = sub.add_parser(name)
        s.add_argument("--steps", type=int, default=300 if name == "compare" else 3000)
        s.add_argument("--model", default="MaskDiT-Digits/2")
        s.add_argument("--size", type=int, default=8, help="digits resolution in pixels")
        s.add_argument("--batch", type=int, default=32)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--out", type=Path, help="write the full report (per-step losses included) as JSON")
    compare, deviation = sub.choices["compare"], sub.choices["ema-deviation"]
    compare.add_argument("--arms", default="amp_fp16,amp_bf16,bf16,fp32",
                         help="comma-separated engine.precision modes (fp16 needs native fp16 or the test switch)")
    compare.add_argument("--spread-seeds", type=int, default=3, help="noise seeds of the paper's loop")
    compare.add_argument("--lr", type=float, default=1e-3)
    compare.add_argument("--decay", type=float, default=0.99)
    compare.add_argument("--mask-ratio", type=float, default=0.5)
    compare.add_argument("--init-scale", type=float, default=None, help="fp16 loss scale to start from")
    deviation.add_argument("--precision", default="bf16", choices=("bf16", "fp16"))
    deviation.add_argument("--every", type=int, default=300)
    deviation.add_argument("--lr", type=float, default=1e-4)
    deviation.add_argument("--decay", type=float, default=0.999)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from maskdit_ds.training import numerics

    if args.command == "compare":
        report = numerics.compare(tuple(args.arms.split(",")), args.steps, args.spread_seeds, args.model, args.size,
                                  args.batch, args.lr, args.mask_ratio, args.decay, args.seed, args.init_scale)
        print(numerics.format_report(report))
    else:
        report = numerics.ema_deviation(args.precision, args.steps, args.every, args.model, args.size, args.batch,
                                        args.lr, args.decay, args.seed)
        print(f"{report['precision']} {report['model']} {report['size']} px, batch {report['batch']}, lr "
              f"{report['lr']}, EMA decay {report['decay']}: relative L2 of the half-copy EMA to the exact EMA")
        print("| step | median over tensors | max | tensor with the max |\n|---|---|---|---|")
        for step, row in report["by_step"].items():
            print(f"| {step} | {row['median']:.2e} | {row['max']:.2e} | {row['worst']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
