"""Time torch.compile of a model's trunk (engine.compile's regional compilation) on this machine, cold: one
training step (forward + backward) per mask ratio, the first one compiling the block graphs of that kept-token
count, the second one not. Compile time per graph = (first - second) / graphs compiled; docs/benchmarks.md
turns it into the GPU check's compile budget (tools/gpu_check_plan.py, MEASURED).

  python tools/time_compile.py --model MaskDiT-XL/2 --input-size 32 --batch 2
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="MaskDiT-XL/2")
    p.add_argument("--input-size", type=int, default=32, help="latent side (32: 256 px)")
    p.add_argument("--batch", type=int, default=2, help="compile time barely depends on it; the step time does")
    p.add_argument("--ratios", default="0.5,0.0")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--cache-dir", default="", help="inductor's cache (default: a fresh one, so the timing is cold)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    # before torch is imported: inductor reads its cache directory once
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.cache_dir or tempfile.mkdtemp(prefix="inductor_cold_")
    import torch
    from torch._dynamo.utils import counters

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from maskdit_ds.config import ModelConfig
    from maskdit_ds.diffusion import MaskedEDMLoss
    from maskdit_ds.model import Masker, build_denoiser, get_size, materialise, token_grid
    from maskdit_ds.training.engine import compile_blocks

    cfg = ModelConfig(name=args.model, input_size=args.input_size, in_channels=4, num_classes=1000)
    with torch.device("meta"):
        net = build_denoiser(cfg, "meta")
    net = materialise(net, torch.device("cpu"))
    compile_blocks(net, backend=args.backend)
    loss_fn, grid = MaskedEDMLoss(get_size(args.model).patch_size, 1000), token_grid(cfg)
    x, y = torch.randn(args.batch, 4, args.input_size, args.input_size), torch.randint(0, 1000, (args.batch,))

    def step(ratio: float) -> float:
        start = time.perf_counter()
        loss, _ = loss_fn(net, x, y, Masker("random", grid, ratio))
        loss.mean().backward()
        net.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    print(f"{args.model} {args.input_size}x{args.input_size}, batch {args.batch}, backend {args.backend}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cache {os.environ['TORCHINDUCTOR_CACHE_DIR']}")
    total_compile, total_graphs = 0.0, 0
    for ratio in (float(r) for r in args.ratios.split(",")):
        graphs_before = counters["stats"]["unique_graphs"]
        first, second = step(ratio), step(ratio)
        graphs = counters["stats"]["unique_graphs"] - graphs_before
        compile_s = max(first - second, 0.0)
        total_compile, total_graphs = total_compile + compile_s, total_graphs + graphs
        print(f"mask ratio {ratio}: first step {first:.1f} s, second {second:.2f} s, {graphs} new graph(s), "
              f"compile {compile_s:.1f} s" + (f" ({compile_s / graphs:.1f} s per graph)" if graphs else ""))
    breaks = dict(counters["graph_break"])
    print(f"total: {total_compile:.1f} s for {total_graphs} graphs = "
          f"{total_compile / max(total_graphs, 1):.1f} s per graph; graph breaks: {breaks or 'none'}")
    return 1 if breaks else 0


if __name__ == "__main__":
    sys.exit(main())
