"""Time MaskDiT training steps, masked vs unmasked side by side in one run, on the real DeepSpeed engine.

    python tools/benchmark.py --model MaskDiT-S/2 --input-size 32 --batch 16 --precision bf16 --baseline
    python tools/benchmark.py --model MaskDiT-XL/2 --input-size 32 --batch 64 --precision fp16   # one GPU
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="MaskDiT-S/2")
    parser.add_argument("--input-size", type=int, default=32, help="latent (or pixel) side, e.g. 32 for 256 px")
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16, help="images per step on this device")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                        help="auto: what training would pick on this machine")
    parser.add_argument("--ratios", default="0.5,0.0", help="mask ratios to interleave")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per mode per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first")
    parser.add_argument("--baseline", action="store_true",
                        help="also time a plain-PyTorch loop (torch AdamW + autocast, no DeepSpeed), interleaved")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off", "both"],
                        help="torch.compile the blocks (auto: on GPUs); both: eager and compiled engines interleaved")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from maskdit_ds.bench import format_rows, run

    rows = run(args.model, args.input_size, args.channels, args.batch, args.precision,
               tuple(float(r) for r in args.ratios.split(",")), args.rounds, args.steps,
               warmup=args.warmup, baseline=args.baseline, compile=args.compile)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    print(format_rows(rows, f"{args.model} {args.input_size}x{args.input_size}x{args.channels}, batch {args.batch}, "
                            f"{rows[0]['precision']}, {device}"))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
