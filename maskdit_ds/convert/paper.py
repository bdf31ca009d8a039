"""The MaskDiT paper's released checkpoints (docs/method.md §9) -> export folders.

Files are torch pickles {'model', 'ema', 'opt', 'args'} (args an argparse.Namespace); keys are prefixed 'model.'
or '_orig_mod.model.' and otherwise named as ours; the two fixed sin-cos tables are checked against ours and
dropped.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..config import ModelConfig
from ..model import MODELS
from ..model.export import expected_shapes
from .common import (PREFIX, ConversionError, block_count, check_state, load_foreign,
                     pick_size, report, require, strip_prefixes, verify_fixed_table, write_export)

PAPER_PREFIXES = ("_orig_mod.model.", "model.")  # torch.compile'd saves add _orig_mod.; longest first


def infer_reference_config(bare: dict, source: str, name: str | None, input_size: int | None) -> ModelConfig:
    """Model size from tensor shapes: x_embedder (D, C, p, p), block counts, decoder width, label table (D, K)."""
    width, channels, patch, _ = require(bare, "x_embedder.proj.weight", source).shape
    table = require(bare, "y_embedder.embedding_table.weight", source)
    if table.shape[0] != width:
        raise ConversionError(f"{source}: y_embedder.embedding_table.weight has shape {list(table.shape)}; "
                              f"MaskDiT stores a bias-free Linear [{width}, classes]. A DiT nn.Embedding table "
                              f"[classes+1, {width}] is imported with the `dit` subcommand")
    wanted = {"backbone": "maskdit", "depth": block_count(bare, "blocks."), "hidden_size": width,
              "patch_size": patch, "decoder_depth": block_count(bare, "decoder_blocks."),
              "decoder_hidden": require(bare, "mask_token", source).shape[-1]}
    name = pick_size(source, wanted, name)
    if input_size is None:
        tokens = require(bare, "pos_embed", source).shape[1]
        input_size = math.isqrt(tokens) * patch
    return ModelConfig(name=name, input_size=input_size, in_channels=channels, num_classes=table.shape[1])


def convert_paper(path: Path, out: Path, use: str = "ema", model: str | None = None,
                      input_size: int | None = None) -> Path:
    """A released MaskDiT .pt ({'model','ema','opt','args'}, keys 'model.'/'_orig_mod.model.') -> export."""
    path = Path(path)
    state, args = load_foreign(path, use)
    bare, counts = strip_prefixes(state, PAPER_PREFIXES, str(path))
    model_cfg = infer_reference_config(bare, str(path), model, input_size)
    size = MODELS[model_cfg.name]
    notes = [verify_fixed_table(bare, "pos_embed", size.hidden_size, str(path))] if "pos_embed" in bare else []
    if "decoder_pos_embed" in bare:
        notes.append(verify_fixed_table(bare, "decoder_pos_embed", size.decoder_hidden, str(path)))
    ours = {PREFIX + k: v for k, v in bare.items()}
    check_state(ours, expected_shapes(model_cfg), f"{path} ({use} weights, as {model_cfg.name})")
    meta = {"step": 0, "weights": use, "source": {"kind": "reference", "file": str(path.resolve()),
                                                   "args": {k: repr(v) for k, v in args.items()}}}
    folder = write_export(out, ours, model_cfg, meta)
    renamed = ", ".join(f"{n} keys lost the prefix {p!r}" for p, n in counts.items()) or "no prefix"
    report(f"reference {path} -> {folder}", [
        f"{len(state)} tensors read from {use!r}; {len(ours)} written with the prefix {PREFIX!r} ({renamed})",
        *notes, f"model {model_cfg.name}, input {model_cfg.input_size}, {model_cfg.in_channels} channels, "
                f"{model_cfg.num_classes} classes"])
    return folder


