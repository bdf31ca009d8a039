"""Representation alignment (REPA, Yu et al. 2024; docs/method.md §11): the encoder's tokens after block k,
through a small trainable projector, are pulled towards a frozen vision encoder's patch features.

Pure torch. The trained module is an AlignedDenoiser: the denoiser plus the projector. The EMA, exports and
sampling hold the denoiser alone (inference needs no projector); ZeRO checkpoints hold both, for resume.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .masking import gather_tokens

PREFIX = "denoiser."  # the denoiser's keys inside an AlignedDenoiser's state dict


@dataclass
class Tap:
    """Asks a trunk for its encoder tokens after block `depth` (1-based); the trunk fills `tokens`
    (N, L_keep, D): the visible patch tokens in the record's ids_keep order, raster order when unmasked."""

    depth: int
    tokens: torch.Tensor | None = None


class Projector(nn.Sequential):
    """REPA's projector: Linear(D, w) SiLU Linear(w, w) SiLU Linear(w, C_teacher), applied per token."""

    def __init__(self, dim: int, width: int, out_dim: int):
        super().__init__(nn.Linear(dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                         nn.Linear(width, out_dim))


class AlignedDenoiser(nn.Module):
    """(x, sigma, labels, record) -> (D (N, C, H, W) float32, projected tokens (N, L_keep, C_teacher) float32)."""

    def __init__(self, denoiser: nn.Module, depth: int, width: int, teacher_dim: int):
        super().__init__()
        self.denoiser, self.depth = denoiser, depth
        self.projector = Projector(denoiser.model.size.hidden_size, width, teacher_dim)

    def forward(self, x, sigma, class_labels=None, record=None) -> tuple[torch.Tensor, torch.Tensor]:
        tap = Tap(self.depth)
        denoised = self.denoiser(x, sigma, class_labels, record=record, tap=tap)
        return denoised, self.projector(tap.tokens).float()


def denoiser_of(module: nn.Module) -> nn.Module:
    """The denoiser inside a trained module (itself when the run does not align)."""
    return module.denoiser if isinstance(module, AlignedDenoiser) else module


def denoiser_state(state: dict) -> dict:
    """A trained module's state dict -> the denoiser's (projector dropped); a denoiser's passes unchanged."""
    if not any(k.startswith(PREFIX) for k in state):
        return state
    return {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}


def alignment_loss(projected: torch.Tensor, target: torch.Tensor, ids_keep: torch.Tensor | None) -> torch.Tensor:
    """Per sample, 1 - cos(projected token, teacher feature) averaged over the tokens the encoder saw.

    projected (N, L_keep, C) in the record's ids_keep order; target (N, L, C) the teacher's features on the token
    grid in raster order; ids_keep (N, L_keep), or None when unmasked (L_keep = L, raster order). -> (N,)
    """
    if ids_keep is not None:
        target = gather_tokens(target, ids_keep)
    cos = torch.nn.functional.cosine_similarity(projected.float(), target.float(), dim=-1)  # (N, L_keep)
    return (1 - cos).mean(dim=1)
