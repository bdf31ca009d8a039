"""Step rules of the EDM sampler (Karras et al. 2022, Alg. 1-2; docs/method.md §6), by sample.solver.

A solver advances the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma by one step, from x at t_cur to
t_next (t_next = 0 on the last step); `denoise(x, sigma)` is the guided network (float64 in, float64 out). The
sampler's loop (noise schedule, churn, per-seed generators) is the same for every solver. A new solver is one
function with this signature, registered in SOLVERS; `sample.solver` (or `sample --solver`) selects it.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..registry import Registry

Denoise = Callable[[torch.Tensor, float], torch.Tensor]


def euler_step(denoise: Denoise, x: torch.Tensor, t_cur: float, t_next: float) -> torch.Tensor:
    """First order: one network call per step."""
    d = (x - denoise(x, t_cur)) / t_cur
    return x + (t_next - t_cur) * d


def heun_step(denoise: Denoise, x: torch.Tensor, t_cur: float, t_next: float) -> torch.Tensor:
    """Second order (EDM's default): an Euler step, then the trapezoidal correction with the slope at its end; the
    last step (to sigma 0, where the slope is undefined) stays Euler. 2 * steps - 1 network calls in all."""
    d = (x - denoise(x, t_cur)) / t_cur
    x_next = x + (t_next - t_cur) * d
    if t_next == 0:
        return x_next
    d_next = (x_next - denoise(x_next, t_next)) / t_next
    return x + (t_next - t_cur) * (0.5 * d + 0.5 * d_next)


SOLVERS: Registry[Callable[..., torch.Tensor]] = Registry("sampler")  # sample.solver
SOLVERS.register("heun", heun_step)
SOLVERS.register("euler", euler_step)
