"""Time loading an export: a CPU build with its random init then load_state_dict (the old way) against
load_pretrained (meta build, load_state_dict(assign=True)), interleaved, in one process, one thread.

  python tools/time_export_load.py FOLDER [--model MaskDiT-XL/2] [--rounds 3]
FOLDER is written first (random weights) when it holds no export.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from maskdit_ds.config import ModelConfig  # noqa: E402
from maskdit_ds.model import build_denoiser, export, load_pretrained  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--model", default="MaskDiT-XL/2")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = ModelConfig(name=args.model, input_size=32, in_channels=4, num_classes=1000)
    weights = Path(args.folder) / "model.safetensors"
    if not weights.is_file():
        export(args.folder, build_denoiser(cfg, device="cpu"), cfg, {"step": 0, "note": "random weights"})

    def with_init():
        net = build_denoiser(cfg)
        net.load_state_dict(load_file(str(weights)))
        return net

    ways = {"random init + load_state_dict": with_init, "load_pretrained": lambda: load_pretrained(args.folder)}
    times = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, load in ways.items():
            start = time.perf_counter()
            net = load()
            times[name].append(time.perf_counter() - start)
            del net
    for name, values in times.items():
        print(f"{name}: {', '.join(f'{v:.2f}' for v in values)} s (median {statistics.median(values):.2f} s)")
    old, new = (statistics.median(v) for v in times.values())
    print(f"median ratio: {old / new:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
