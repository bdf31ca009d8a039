"""DiT's released weights (facebookresearch/DiT) as MaskDiT's encoder initialisation -> export folders."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..config import ModelConfig
from ..model import build_denoiser
from ..model.export import expected_shapes
from .common import (PREFIX, ConversionError, block_count, check_state, load_foreign, pick_size,
                     report, require, strip_prefixes, verify_fixed_table, write_export)

# DiT parts that MaskDiT does not have or shapes differently: its final layer predicts p*p*2C (learned sigma) from
# width D, ours p*p*C from the decoder's width.
DIT_DROPPED = ("final_layer.",)
# MaskDiT parts that DiT has no weights for: they keep the fresh initialisation of build_denoiser.
DIT_FRESH = ("decoder_layer.", "decoder_blocks.", "mask_token", "final_layer.")


def dit_encoder_state(bare: dict, source: str, num_classes: int) -> tuple[dict, list[str]]:
    """DiT keys -> ours for the shared trunk. DiT's label table is an nn.Embedding (classes + 1, D) whose last
    row is its null class; ours is a bias-free Linear (D, classes) on one-hot rows whose unconditional input is
    the zero vector, so we keep rows 0..classes-1, transposed, and drop the null row."""
    table = require(bare, "y_embedder.embedding_table.weight", source)
    if table.shape[0] != num_classes + 1:
        raise ConversionError(f"{source}: y_embedder.embedding_table.weight has shape {list(table.shape)}, "
                              f"expected [{num_classes + 1}, D] (DiT: {num_classes} classes + a null row)")
    mapped, notes = {}, []
    for key, value in bare.items():
        if key == "y_embedder.embedding_table.weight":
            mapped[PREFIX + key] = value[:num_classes].t().contiguous()  # (D, classes)
            notes.append(f"{key} {list(value.shape)} -> {PREFIX}{key} {[value.shape[1], num_classes]} "
                         f"(rows 0..{num_classes - 1} transposed; null row {num_classes} dropped)")
        elif key.startswith(DIT_DROPPED):
            notes.append(f"{key} {list(value.shape)} dropped (DiT's learned-sigma head)")
        else:
            mapped[PREFIX + key] = value
    return mapped, notes


def convert_dit(path: Path, out: Path, use: str = "ema", model: str | None = None, input_size: int | None = None,
                seed: int = 0) -> Path:
    """DiT's released weights -> a MaskDiT export whose encoder is DiT's; decoder parts keep a fresh init."""
    path = Path(path)
    state, _ = load_foreign(path, use)
    bare, counts = strip_prefixes(state, ("_orig_mod.", "module."), str(path))
    width, channels, patch, _ = require(bare, "x_embedder.proj.weight", str(path)).shape
    num_classes = require(bare, "y_embedder.embedding_table.weight", str(path)).shape[0] - 1
    name = pick_size(str(path), {"backbone": "maskdit", "depth": block_count(bare, "blocks."),
                                 "hidden_size": width, "patch_size": patch}, model)
    if input_size is None:
        input_size = math.isqrt(require(bare, "pos_embed", str(path)).shape[1]) * patch
    model_cfg = ModelConfig(name=name, input_size=input_size, in_channels=channels, num_classes=num_classes)
    notes = [verify_fixed_table(bare, "pos_embed", width, str(path))] if "pos_embed" in bare else []
    mapped, more = dit_encoder_state(bare, str(path), num_classes)
    expected = expected_shapes(model_cfg)
    encoder = {k: s for k, s in expected.items() if not k[len(PREFIX):].startswith(DIT_FRESH)}
    check_state(mapped, encoder, f"{path} (DiT {use} weights as the encoder of {name})")

    torch.manual_seed(seed)
    net = build_denoiser(model_cfg)  # fresh init (decoder, mask token, final layer), then DiT's encoder
    full = {**net.state_dict(), **mapped}
    fresh = sorted(set(expected) - set(mapped))
    meta = {"step": 0, "weights": use, "source": {"kind": "dit", "file": str(path.resolve()), "seed": seed,
                                                   "fresh_init": list(DIT_FRESH)}}
    folder = write_export(out, full, model_cfg, meta)
    renamed = ", ".join(f"{n} keys lost the prefix {p!r}" for p, n in counts.items()) or "no prefix removed"
    report(f"dit {path} -> {folder}", [
        f"{len(mapped)} tensors mapped into the encoder ({renamed}; all gain {PREFIX!r})", *notes, *more,
        f"{len(fresh)} tensors keep a fresh init (seed {seed}): {', '.join(DIT_FRESH)}",
        f"model {name}, input {input_size}, {channels} channels, {num_classes} classes"])
    return folder
