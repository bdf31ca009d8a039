"""AdamW kernels by engine.optimizer: each entry is what DeepSpeed's AdamW takes beside lr, betas, eps and
weight_decay (those come from optim.*). Light on purpose: config validation reads the names without DeepSpeed.

torch's AdamW (ZeRO-supported, so no untested-optimizer switch) needs no build; DeepSpeed's FusedAdam JIT-compiles
CUDA code on first use (nvcc + ninja on every node, 1-2 minutes per fresh node). `auto` (engine.optimizer_impl)
picks torch_fused on GPUs and CPUs.
"""
from __future__ import annotations

from .registry import Registry

OPTIMIZERS: Registry[dict] = Registry("optimizer")  # engine.optimizer (besides auto)
# torch_fused: one fused kernel per step (CUDA; also CPU in torch 2.4+); torch: torch's default (unfused) implementation
OPTIMIZERS.register("torch_fused", {"torch_adam": True, "fused": True})
OPTIMIZERS.register("torch", {"torch_adam": True})
OPTIMIZERS.register("deepspeed_fused", {})  # DeepSpeed FusedAdam (JIT build)
