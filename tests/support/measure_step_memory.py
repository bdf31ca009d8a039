"""Run one real training step on the CPU and print the bytes it needed (test_memory_plan.py's reference).

  python measure_step_memory.py MODEL INPUT_SIZE BATCH RATIO PRECISION [checkpointing]
Prints {"rss_peak_growth": bytes}: the process's peak resident memory during the step (VmHWM, reset just before
it) minus its resident memory just before the step. The test runs this with MALLOC_MMAP_THRESHOLD_ small, so glibc maps every tensor on its own
and returns it to the system when freed: resident memory then follows the live tensors (the allocator's truth,
not our trace). The model's own memory, and the kernels' code and caches (a one-image step runs first), are in
place before the step, so the growth is the step's.
"""
import json
import resource
import sys

import torch

from maskdit_ds.config import ModelConfig
from maskdit_ds.diffusion import MaskedEDMLoss
from maskdit_ds.model import Masker, build_denoiser, get_size, token_grid
from maskdit_ds.model.checkpointing import checkpoint_blocks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak() -> None:
    """Restart the kernel's peak-resident counter (VmHWM) from the current resident size: the peak then belongs to
    what runs next, not to imports or the model's build (Linux: writing 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        kib = next(line for line in f if line.startswith("VmHWM:")).split()[1]
    return int(kib) * 1024


def drop_grad(p: torch.Tensor) -> None:
    p.grad = None


def main(model, input_size, batch, ratio, precision, *flags):
    cfg = ModelConfig(name=model, input_size=int(input_size), in_channels=4, num_classes=10)
    torch.manual_seed(0)
    torch.set_default_dtype(DTYPES[precision])  # the whole network in the training dtype, as DeepSpeed casts it
    net = build_denoiser(cfg)
    torch.set_default_dtype(torch.float32)
    if "checkpointing" in flags:
        checkpoint_blocks(net)
    for p in net.parameters():
        p.register_post_accumulate_grad_hook(drop_grad)  # ZeRO-2 moves gradients into its buckets
    loss_fn = MaskedEDMLoss(get_size(model).patch_size, cfg.num_classes)
    masker = Masker("random", token_grid(cfg), float(ratio))
    for n in (1, int(batch)):  # a one-image step first: kernels' code and caches become resident before we measure
        x, y = torch.randn(n, 4, cfg.input_size, cfg.input_size), torch.randint(0, cfg.num_classes, (n,))
        before = resident_bytes()
        reset_peak()
        loss, _ = loss_fn(net, x, y, masker)
        loss.mean().backward()
        del loss
    peak = peak_bytes()  # since the last reset_peak(): the batch step's
    print(json.dumps({"rss_peak_growth": peak - before, "rss_before": before}))


if __name__ == "__main__":
    main(*sys.argv[1:])
