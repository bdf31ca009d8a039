"""EDM sampler (Karras et al. 2022, Alg. 2; docs/method.md §6) with classifier-free guidance and one generator per
image seed.

The solver state is float64; the network runs in fp32 (or under the caller's autocast). Because every image owns
its generator (noise first, then its class, then any churn noise), the images do not depend on batch size or on
how many ranks produced them.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from .solvers import SOLVERS

if TYPE_CHECKING:  # the diffusion layer takes its settings as an argument and never imports the config module
    from ..config import SamplerConfig


def sigma_schedule(steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """(steps + 1,) float64: t_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, then t_N = 0."""
    i = torch.arange(steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    t = (hi + i / max(steps - 1, 1) * (lo - hi)) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def seeded_inputs(seeds, shape, num_classes: int, class_labels=None):
    """Per seed: a CPU generator, its noise (shape) and then its uniform random class (unless labels are given)."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
    drawn = torch.stack([torch.randint(num_classes, (), generator=g) for g in gens])
    labels = drawn if class_labels is None else torch.as_tensor(class_labels, dtype=torch.long)
    return noise, labels, gens


class _Denoiser:
    def __init__(self, net, labels, cfg: SamplerConfig):
        self.net, self.labels, self.cfg = net, labels, cfg

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        lo, hi = self.cfg.guidance_interval
        g = self.cfg.guidance if lo <= sigma <= hi else 1.0
        s = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)
        return self.net.guided(x.float(), s, self.labels, g).double()


@torch.no_grad()
def edm_sample(net, noise: torch.Tensor, class_labels, cfg: SamplerConfig, generators=None) -> torch.Tensor:
    """noise (N, C, H, W) standard normal -> samples (N, C, H, W) float64, each step taken by cfg.solver."""
    denoise, solver = _Denoiser(net, class_labels, cfg), SOLVERS[cfg.solver]
    t = sigma_schedule(cfg.steps, cfg.sigma_min, cfg.sigma_max, cfg.rho).tolist()
    x = noise.double() * t[0]
    for i in range(cfg.steps):
        t_cur, t_next = t[i], t[i + 1]
        gamma = min(cfg.S_churn / cfg.steps, math.sqrt(2) - 1) if cfg.S_min <= t_cur <= cfg.S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x
        if gamma > 0:
            eps = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(x)
            x_hat = x + math.sqrt(t_hat**2 - t_cur**2) * cfg.S_noise * eps
        x = solver(denoise, x_hat, t_hat, t_next)
    return x


def sample_seeds(net, seeds, shape, num_classes: int, cfg: SamplerConfig, device, class_labels=None,
                 batch_size=64, progress: bool = False):
    """Sample one image per seed in batches -> (float64 (N, *shape) on CPU, int64 labels (N,)).
    progress: a tqdm bar in images (images/s) on this process."""
    images, labels = [], []
    bar = tqdm(total=len(seeds), unit="img", desc="sampling", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(seeds), batch_size):
        chunk = list(seeds[start : start + batch_size])
        given = None if class_labels is None else class_labels[start : start + batch_size]
        noise, y, gens = seeded_inputs(chunk, shape, num_classes, given)
        out = edm_sample(net, noise.to(device), y.to(device), cfg, generators=gens)
        images.append(out.cpu())
        labels.append(y)
        bar.update(len(chunk))
    bar.close()
    return torch.cat(images), torch.cat(labels)
