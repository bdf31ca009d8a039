"""Time training steps (forward + backward + AdamW) at several mask ratios side by side, at equal batch.

Plain torch in one process (no DeepSpeed): the masked EDM loss on random data, one optimizer step per timed step.
Ratios are interleaved round by round, in a rotating order, so machine noise hits them alike; the table shows the
median step time per ratio, the measured speed-up over ratio 0 and the analytic FLOP ratio.

    python tools/bench_mask_ratios.py --model MaskDiT-S/2 --input-size 32 --channels 4 --batch 16
    python tools/bench_mask_ratios.py --model MaskDiT-Digits/2 --input-size 16 --channels 1 --batch 64 \
        --strategy block --block-size 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from maskdit_ds.loss import MaskedEDMLoss  # noqa: E402
from maskdit_ds.model import build_denoiser, forward_flops, get_size  # noqa: E402
from maskdit_ds.model.masking import make_mask  # noqa: E402


def model_flops(name: str, input_size: int, channels: int, ratio: float) -> float:
    return forward_flops(get_size(name), input_size, channels, ratio)  # dispatches on the backbone


def make_step(args, device):
    """One closure per run: a training step at a given ratio on a fixed random batch."""
    cfg = types.SimpleNamespace(name=args.model, input_size=args.input_size, in_channels=args.channels,
                                num_classes=args.classes, sigma_data=0.5)
    torch.manual_seed(0)
    net = build_denoiser(cfg).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    size = get_size(args.model)
    loss_fn = MaskedEDMLoss(size.patch_size, args.classes)
    grid = args.input_size // size.patch_size
    images = torch.randn(args.batch, args.channels, args.input_size, args.input_size, device=device)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext())

    def step(ratio: float) -> None:
        mask = None
        if ratio > 0 and args.strategy != "random":  # as the trainer does: structured masks are passed in
            mask = make_mask(args.strategy, args.batch, grid, ratio, args.block_size, device=device).mask
        with autocast:
            loss, _ = loss_fn(net, images, labels, ratio, mask=mask)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        opt.step()

    return step


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(args, device) -> dict[float, list[float]]:
    step, ratios = make_step(args, device), args.ratios
    times: dict[float, list[float]] = {r: [] for r in ratios}
    for round_index in range(args.warmup_rounds + args.rounds):
        order = ratios[round_index % len(ratios):] + ratios[: round_index % len(ratios)]  # rotate the order
        for ratio in order:
            for _ in range(args.steps):
                sync(device)
                start = time.perf_counter()
                step(ratio)
                sync(device)
                if round_index >= args.warmup_rounds:
                    times[ratio].append(time.perf_counter() - start)
    return times


def table(args, times: dict[float, list[float]], device_name: str) -> tuple[str, list[dict]]:
    base = statistics.median(times[0.0]) if 0.0 in times else None
    base_flops = model_flops(args.model, args.input_size, args.channels, 0.0)
    rows, lines = [], [
        f"{args.model} {args.input_size}x{args.input_size}x{args.channels}, batch {args.batch}, {args.precision}, "
        f"mask strategy {args.strategy}, {device_name}; {args.rounds} rounds x {args.steps} steps per ratio",
        "", "| mask ratio | median step (ms) | min (ms) | images/s | speed-up vs 0 | FLOP ratio 0/r |",
        "|---|---|---|---|---|---|"]
    for ratio, values in times.items():
        med = statistics.median(values)
        flops = model_flops(args.model, args.input_size, args.channels, ratio)
        row = {"ratio": ratio, "median_ms": 1e3 * med, "min_ms": 1e3 * min(values), "images_per_s": args.batch / med,
               "speedup": base / med if base else None, "flop_ratio": base_flops / flops, "samples": len(values)}
        rows.append(row)
        speed = f"{row['speedup']:.2f}x" if base else "-"
        lines.append(f"| {ratio:g} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | {row['images_per_s']:.1f} | "
                     f"{speed} | {row['flop_ratio']:.2f}x |")
    return "\n".join(lines), rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="MaskDiT-S/2", help="a name from maskdit_ds.model.registry.MODELS")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ratios", default="0,0.5,0.75,0.9")
    parser.add_argument("--strategy", default="random", choices=["random", "block", "crop"])
    parser.add_argument("--block-size", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per ratio per round")
    parser.add_argument("--warmup-rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    args.ratios = [float(r) for r in args.ratios.split(",")]
    if any(not 0 <= r < 1 for r in args.ratios):
        parser.error(f"--ratios: every ratio must be in [0, 1), got {args.ratios}")
    get_size(args.model)  # unknown names fail here, listing the known ones
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    text, rows = table(args, measure(args, device), name)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "json"},
                                               "device": name, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
