"""Run under torchrun with 2 ranks: train a small MaskDiT under pure bf16 ZeRO-2 and compare, after every step,
training/ema.py's partitioned EMA with an fp32 reference EMA of the consolidated fp32 masters, and the old EMA of
the module's bf16 copy with the same reference. Rank 0 writes the result as JSON to argv[1]."""
import copy
import json
import sys

import torch

from maskdit_ds import dist
from maskdit_ds.diffusion import MaskedEDMLoss, ema_update
from maskdit_ds.model import Masker, build_denoiser, get_size, token_grid
from maskdit_ds.training.ema import MasterEMA
from maskdit_ds.training.engine import Engine, init_distributed
from maskdit_ds.training.numerics import numerics_config, relative_l2

STEPS, DECAY = 6, 0.9


def main(out: str) -> None:
    init_distributed()
    cfg = numerics_config("MaskDiT-T/2", 8, 4, 1e-3, 0.5, precision="bf16")
    cfg.train.global_batch = 4 * dist.world_size()
    cfg.model.in_channels = 1
    torch.manual_seed(0)  # the same initial weights on every rank
    net = build_denoiser(cfg.model)
    reference, old, start = (copy.deepcopy(net).requires_grad_(False) for _ in range(3))  # fp32, before the
    engine = Engine(net, cfg, dist.world_size())  # engine casts `net` to bf16 in place
    ema = MasterEMA(start, engine)
    loss_fn = MaskedEDMLoss(get_size(cfg.model.name).patch_size, cfg.model.num_classes)
    masker = Masker("random", token_grid(cfg.model), 0.5)
    torch.manual_seed(1 + dist.rank())  # different data and noise per rank, as in training
    result = {"max_abs_diff": [], "old_rel_l2": []}
    for _ in range(STEPS):
        x, y = torch.randn(4, 1, 8, 8), torch.randint(0, cfg.model.num_classes, (4,))
        loss, _ = loss_fn(engine, x, y, masker)
        engine.backward(loss.mean())
        engine.step()
        ema.update(DECAY)
        ema_update(old, engine.module, DECAY)  # the old way: the module's rounded bf16 copy
        masters = engine.full_fp32_state()  # collective: the consolidated fp32 masters
        with torch.no_grad():
            for name, p in reference.named_parameters():
                p.lerp_(masters[name], 1 - DECAY)
        full = ema.gather().state_dict()
        ref = {k: v for k, v in reference.state_dict().items() if k in dict(reference.named_parameters())}
        result["max_abs_diff"].append(max(float((full[k] - v).abs().max()) for k, v in ref.items()))
        result["old_rel_l2"].append(relative_l2({k: old.state_dict()[k] for k in ref}, ref))
    result["partitions"] = [p.numel() for p in engine.master_partitions()]
    result["params"] = sum(p.numel() for p in net.parameters())
    if dist.is_main():
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
