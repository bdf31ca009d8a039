"""Shared by the converters: expected keys and shapes of our networks, the safe loader for foreign .pt files, the
export writer and the report each converter prints.

Every converter checks keys and shapes against a freshly built network (on the meta device) before writing,
prints what it mapped, and never unpickles anything but tensors, containers and argparse.Namespace.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file

from .. import dist
from ..config import ModelConfig
from ..model import MODELS
from ..model.export import export_state, shape_problems
from ..model.layers import sincos_2d_table

PREFIX = "model."  # EDMPrecond wraps the trunk as .model
TABLE_TOLERANCE = 1e-6


class ConversionError(ValueError):
    """The input cannot be converted; the message names the file, the key, and expected vs found."""


def check_state(state: dict, expected: dict[str, tuple], source: str) -> None:
    """Fail before writing anything when keys are missing, unexpected, or shaped differently."""
    problems = shape_problems(state, expected)
    if problems:
        raise ConversionError(f"{source}: " + " | ".join(problems))


def write_export(folder: Path, state: dict, model_cfg: ModelConfig, meta: dict) -> Path:
    """model.export.export_state of an imported state dict, whose tensors may share storage (safetensors refuses
    that), so each is cloned first; .float() keeps fp32 bits unchanged."""
    return export_state(folder, {k: v.detach().float().clone().contiguous() for k, v in state.items()},
                             model_cfg, meta)


def report(title: str, lines: list[str]) -> None:
    dist.say(f"[convert] {title}" + "".join(f"\n  {line}" for line in lines))


def model_config_from(values: dict, source: str) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConversionError(f"{source}: unknown model fields {unknown}; expected a subset of {sorted(fields)}")
    cfg = ModelConfig(**values)
    if cfg.name not in MODELS:
        raise ConversionError(f"{source}: model.name {cfg.name!r} is not a registered size")
    return cfg


# ---------------------------------------------------------------- safe loading of foreign files


def safe_torch_load(path: Path):
    """torch.load with weights_only=True and argparse.Namespace as the only extra allowed global.

    A pickle that references anything else (os.system in a __reduce__, an arbitrary class) is refused before a
    single object is built from it.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = str(err).split("\n")
        culprit = next((line.strip() for line in detail if "Unsupported global" in line or "GLOBAL" in line),
                       detail[0])
        raise ConversionError(f"{path}: refused to unpickle: the file needs code outside the allow-list "
                              f"(tensors, containers, argparse.Namespace): {culprit}. A checkpoint that carries "
                              f"code is never loaded; re-save its tensors with torch.save(state_dict) or as "
                              f"safetensors.") from None


def load_foreign(path: Path, use: str) -> tuple[dict, dict]:
    """(state dict of tensors, args as a dict) from a .pt ({'model','ema','opt','args'} or a bare state dict)
    or a .safetensors file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path)), {}
    obj = safe_torch_load(path)
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a dict, found {type(obj).__name__}")
    args = obj.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else (args if isinstance(args, dict) else {})
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}  # a bare state dict (DiT's released files)
    if use not in obj:
        raise ConversionError(f"{path}: no {use!r} entry; the file has {sorted(obj)}")
    state = obj[use]
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}: entry {use!r} is not a state dict of tensors (e.g. {bad[0]!r})")
    return dict(state), args


def strip_prefixes(state: dict, prefixes, source: str) -> tuple[dict, dict[str, int]]:
    """Remove the first matching prefix of each key. Returns the bare state and a count per prefix removed."""
    bare, counts = {}, {}
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), "")
        name = key[len(prefix):]
        if name in bare:
            raise ConversionError(f"{source}: key {name!r} appears twice (with different prefixes)")
        bare[name] = value
        if prefix:
            counts[prefix] = counts.get(prefix, 0) + 1
    return bare, counts


def verify_fixed_table(bare: dict, key: str, width: int, source: str) -> str:
    """The released files store the frozen sin-cos tables; ours recompute them. Check they agree, then drop."""
    found = bare.pop(key)
    grid = math.isqrt(found.shape[1]) if found.dim() == 3 else -1
    if found.dim() != 3 or found.shape[0] != 1 or grid * grid != found.shape[1] or found.shape[2] != width:
        raise ConversionError(f"{source}: {key} has shape {list(found.shape)}, expected [1, grid*grid, {width}]")
    ours = sincos_2d_table(width, grid)
    diff = (found.float() - ours).abs().max().item()
    if diff > TABLE_TOLERANCE:
        raise ConversionError(f"{source}: {key} differs from our recomputed sin-cos table by {diff:.3g} "
                              f"(> {TABLE_TOLERANCE}); the file uses a different position encoding")
    return f"{key} {list(found.shape)} dropped (equals our recomputed table, max |diff| {diff:.2g})"


def block_count(bare: dict, prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in bare if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def require(bare: dict, key: str, source: str) -> torch.Tensor:
    if key not in bare:
        raise ConversionError(f"{source}: missing key {key!r} (needed to infer the model size)")
    return bare[key]


def pick_size(source: str, wanted: dict, name: str | None) -> str:
    """The registry name whose sizes equal `wanted` (depth, hidden_size, patch_size, ...), or the given name."""
    if name:
        if name not in MODELS:
            raise ConversionError(f"--model {name!r} is not a registered size; known: {', '.join(sorted(MODELS))}")
        return name
    matches = [n for n, s in MODELS.items() if all(getattr(s, k) == v for k, v in wanted.items())]
    if not matches:
        raise ConversionError(f"{source}: no registered model has {wanted}; pass --model NAME")
    if len({MODELS[n] for n in matches}) > 1:
        raise ConversionError(f"{source}: several registered sizes fit {wanted} ({', '.join(matches)}); "
                              f"pass --model NAME")
    return matches[0]
