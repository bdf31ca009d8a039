"""Time MaskDiT training steps on one device: mask ratios side by side in one run, on the real DeepSpeed engine
(eager and/or compiled) and optionally a plain-PyTorch baseline, interleaved.

    python -m maskdit_ds bench --model MaskDiT-S/2 --input-size 32 --batch 16 --baseline
    python -m maskdit_ds bench --model MaskDiT-XL/2 --input-size 32 --batch 128 --precision fp16 --compile both
    python -m maskdit_ds bench --model UViT-Digits/2 --input-size 32 --channels 3 --batch 32 --no-deepspeed \\
        --ratios 0,0.5,0.75,0.9 --strategy block --block-size 2              # plain torch, MaskDM's block masks
    python -m maskdit_ds bench --model MaskDiT-XL/2 --batch 128 --precision fp16 \\
        --align facebook/dinov2-base --align-depth 8                         # REPA's overhead, side by side
    python -m maskdit_ds bench --batch 8 --precision fp32 --baseline --compile off --ratios 0.5 \\
        --ds-config my_zero2.json --profile 3      # engine settings side by side, where the extra time goes
    deepspeed --num_gpus 2 --module maskdit_ds bench ...    # every rank steps; the baseline in torch DDP
"""
import argparse
import os
import sys
from pathlib import Path

from .. import io
from ..config import ENGINE_PRECISIONS, LossConfig
from ..model import MODELS, STRATEGIES
from . import command, parser


def parse(argv=None) -> argparse.Namespace:
    p = parser("bench", __doc__)
    p.add_argument("--model", default="MaskDiT-S/2", choices=list(MODELS), metavar="NAME",
                   help="a registered model size (model.name), e.g. MaskDiT-XL/2")
    p.add_argument("--input-size", type=int, default=32, help="latent (or pixel) side, e.g. 32 for 256 px")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--batch", type=int, default=16, help="images per step on this device")
    p.add_argument("--precision", default="auto", choices=ENGINE_PRECISIONS,
                   help="auto: what training would pick on this machine")
    p.add_argument("--ratios", default="0.5,0.0", help="mask ratios to interleave")
    p.add_argument("--strategy", default="random", choices=list(STRATEGIES), help="mask strategy")
    p.add_argument("--block-size", type=int, default=2, help="tokens per block side for --strategy block")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="steps per mode per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first")
    p.add_argument("--baseline", action="store_true",
                   help="also time a plain-PyTorch loop (torch AdamW + autocast, no DeepSpeed), interleaved")
    p.add_argument("--no-deepspeed", action="store_true", help="only the plain-PyTorch loop")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off", "both"],
                   help="torch.compile the blocks (auto: on GPUs); both: eager and compiled engines interleaved")
    p.add_argument("--align", metavar="TEACHER", default="",
                   help="also time every runner with representation alignment: this teacher (folder or hub id)")
    loss = LossConfig()  # the training defaults (REPA's), not a second copy of them
    p.add_argument("--align-depth", type=int, default=loss.align_depth, help="encoder block whose tokens are aligned")
    p.add_argument("--align-proj-dim", type=int, default=loss.align_proj_dim, help="projector width")
    p.add_argument("--teacher-resolution", type=int, default=loss.align_teacher_resolution,
                   help="image side the teacher sees")
    p.add_argument("--ds-config", action="append", default=[], metavar="JSON",
                   help="one more engine with this ds_config (shipped name or path), side by side; repeatable")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile STEPS more steps of each mode (torch.profiler) and print, per "
                        "engine, the ops that take extra time against the plain loop and DeepSpeed's phases")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    args.ratios = tuple(float(r) for r in args.ratios.split(","))
    if any(not 0 <= r < 1 for r in args.ratios):
        p.error(f"--ratios: every ratio must be in [0, 1), got {args.ratios}")
    return args


@command
def main(argv=None) -> int:
    args = parse(argv)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from .. import dist
    from ..training.bench import format_profile, format_rows, run

    align = {"teacher": args.align, "depth": args.align_depth, "proj_dim": args.align_proj_dim,
             "resolution": args.teacher_resolution} if args.align else None
    rows, profiles = run(args.model, args.input_size, args.channels, args.batch, args.precision, args.ratios,
                         args.rounds, args.steps, warmup=args.warmup, baseline=args.baseline, compile=args.compile,
                         strategy=args.strategy, block_size=args.block_size, deepspeed=not args.no_deepspeed,
                         align=align, ds_configs=tuple(args.ds_config), profile_steps=args.profile)
    if not dist.is_main():
        return 0
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    print(format_rows(rows, f"{args.model} {args.input_size}x{args.input_size}x{args.channels}, batch {args.batch}, "
                            f"{rows[0]['precision']}, {device}"))
    if profiles:
        print(format_profile(profiles))
    if args.json:
        io.atomic_write_json(Path(args.json), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
