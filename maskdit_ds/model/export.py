"""Export folders: the one weight format everything outside training reads (sampling, conversion, init_from).

folder/model.safetensors holds float32 tensors named as EDMPrecond.state_dict() (the trunk under `model.`; the
fixed sin-cos tables are recomputed, never stored); folder/config.json holds {"format": "maskdit_ds",
"version": 1, "model": {name, input_size, in_channels, num_classes, sigma_data}, "step", ...provenance}.
A run directory keeps its exports in export/step_XXXXXXX/.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..io import atomic_path, atomic_save_safetensors, atomic_write_text, storage_guard

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
EXPORT_PREFIX = "step_"


def export(folder: Path, net: torch.nn.Module, model_cfg, meta: dict) -> Path:
    """Write folder/{config.json, model.safetensors} atomically (a temp folder renamed into place)."""
    return export_state(folder, net.state_dict(), model_cfg, meta)


def export_state(folder: Path, state: dict, model_cfg, meta: dict) -> Path:
    """export() from a state dict (the converters' entry point): fp32 weights + config.json, atomically."""
    folder = Path(folder)
    with storage_guard(folder, "export"), atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        atomic_save_safetensors({k: v.float() for k, v in state.items()}, tmp / EXPORT_WEIGHTS,
                                metadata={"format": "pt"})
        config = {"format": "maskdit_ds", "version": 1, "model": dataclasses.asdict(model_cfg), **meta}
        atomic_write_text(tmp / EXPORT_CONFIG, json.dumps(config, indent=2))
    return folder


def list_exports(run_dir: Path) -> list[Path]:
    """<run_dir>/export/step_XXXXXXX folders, oldest first (temporaries excluded)."""
    folder = Path(run_dir) / "export"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(EXPORT_PREFIX)
                  and p.name[len(EXPORT_PREFIX):].isdigit())


def find_export(path: Path) -> Path:
    """An export folder, or a run directory (its newest export)."""
    path = Path(path)
    if (path / EXPORT_CONFIG).is_file() and (path / EXPORT_WEIGHTS).is_file():
        return path
    exports = [e for e in list_exports(path) if (e / EXPORT_WEIGHTS).is_file() and (e / EXPORT_CONFIG).is_file()]
    if not exports:
        raise FileNotFoundError(f"{path}: neither an export folder (config.json + model.safetensors) "
                                f"nor a run directory with export/step_* folders")
    return exports[-1]


def read_export_config(folder: Path) -> dict:
    config = json.loads((Path(folder) / EXPORT_CONFIG).read_text())
    if config.get("format") != "maskdit_ds" or "model" not in config:
        raise ValueError(f"{folder}/config.json is not a maskdit_ds export (format={config.get('format')!r})")
    return config


def load_pretrained(path, device="cpu"):
    """EDMPrecond in eval mode from an export folder or a run directory; `net(x, sigma, class_labels)` -> D.

    The network is built on the meta device and takes the file's tensors as its parameters (assign=True), read
    straight onto `device`: no random init and no second copy, so an XL/2 export loads in seconds."""
    from safetensors.torch import load_file

    from ..config import ModelConfig
    from . import build_denoiser

    folder = find_export(Path(path))
    config = read_export_config(folder)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    net = build_denoiser(ModelConfig(**{k: v for k, v in config["model"].items() if k in fields}), device="meta")
    state = load_file(str(folder / EXPORT_WEIGHTS), device=str(torch.device(device)))
    missing, unexpected = net.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{folder}/{EXPORT_WEIGHTS} does not match {config['model']['name']}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return net.to(device).eval().requires_grad_(False)  # .to: the fixed sin-cos tables, computed on device
