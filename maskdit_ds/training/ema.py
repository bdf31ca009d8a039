"""The EMA of the fp32 master weights (docs/method.md §12), in every precision mode.

Each rank keeps the EMA of the ZeRO-2 master partition it owns: a flat fp32 tensor per parameter group, updated
with one fused lerp per step against the masters the optimizer just wrote (no communication, 1/world of the
work and memory of a full EMA). Under pure fp16/bf16 this is the only exact EMA: the module's half copy is
rounded, and late in training a weight can sit in one bf16 rounding bucket for thousands of steps, so an EMA of
the copy converges to the rounded value. Checkpoints, exports, grids and sampling read `module`, the full fp32
EMA network, which gather() fills from every rank's partition (a collective).
"""
from __future__ import annotations

import torch

from .. import dist


class MasterEMA:
    """ema <- decay * ema + (1 - decay) * master, per rank over its master partition.

    module: the full fp32 EMA network (the denoiser; loaded from a checkpoint or a copy of the starting weights).
    engine: the stage's Engine; its module's parameters named `prefix + name` are the EMA's `name` (the engine
    may train more than the denoiser, e.g. REPA's projector, whose masters the EMA ignores).
    """

    def __init__(self, module: torch.nn.Module, engine, prefix: str = ""):
        self.module, self.masters = module, engine.master_partitions()
        if self.masters is None:
            raise RuntimeError("the EMA needs ZeRO-2's fp32 master partitions; this engine keeps none")
        own = dict(module.named_parameters())
        # per group: EMA parameter -> (offset in the group's flat buffer, numel)
        self.layout = [{own[name[len(prefix):]]: (offset, shape.numel()) for name, (offset, shape) in group.items()
                        if name.startswith(prefix) and name[len(prefix):] in own}
                       for group in engine.partition_layout()]
        missing = set(own.values()) - {p for group in self.layout for p in group}
        if missing:
            raise RuntimeError(f"{len(missing)} EMA parameters have no fp32 master in the engine")
        self.parts = [m.detach().clone() for m in self.masters]  # positions the EMA does not cover: any value
        self.scatter()

    def _bounds(self, group: int) -> tuple[int, int]:
        """[start, end) of this rank's partition in group `group`'s flat buffer."""
        size = self.parts[group].numel()
        return dist.rank() * size, (dist.rank() + 1) * size

    @torch.no_grad()
    def scatter(self) -> None:
        """The partitions from `module` (after a load, or at the start of a stage)."""
        for group, (part, params) in enumerate(zip(self.parts, self.layout)):
            start, end = self._bounds(group)
            for param, (offset, numel) in params.items():
                lo, hi = max(offset, start), min(offset + numel, end)  # the slice of this param that we own
                if lo < hi:
                    part[lo - start:hi - start].copy_(param.detach().reshape(-1)[lo - offset:hi - offset])

    @torch.no_grad()
    def update(self, decay: float) -> None:
        torch._foreach_lerp_(self.parts, [m.detach() for m in self.masters], 1.0 - decay)

    @torch.no_grad()
    def gather(self) -> torch.nn.Module:
        """Collective: every rank's partitions into the full `module`, which it returns."""
        for part, params in zip(self.parts, self.layout):
            full = dist.all_gather_flat(part)  # (world * partition_size,)
            for param, (offset, numel) in params.items():
                param.copy_(full[offset:offset + numel].view_as(param))
        return self.module

    def finite(self) -> torch.Tensor:
        """0-dim device flag, 1 when this rank's EMA partitions are all finite."""
        return torch.stack([torch.isfinite(p).all() for p in self.parts]).all().float()
