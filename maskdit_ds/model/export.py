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

from types import SimpleNamespace

import torch

from ..errors import InputError, one_line
from ..io import atomic_path, atomic_save_safetensors, atomic_write_text

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
STEP_PREFIX = "step_"  # checkpoint tags and exports are both named step_XXXXXXX
MODEL_METADATA = "maskdit_ds.model"  # model.safetensors' metadata key: the model record, as in config.json
DENOISER_FIELDS_MATCHED = ("name", "input_size", "in_channels", "num_classes")  # what the weights mean


def export(folder: Path, net: torch.nn.Module, model_cfg, meta: dict) -> Path:
    """Write folder/{config.json, model.safetensors} atomically (a temp folder renamed into place)."""
    return export_state(folder, net.state_dict(), model_cfg, meta)


def export_state(folder: Path, state: dict, model_cfg, meta: dict) -> Path:
    """export() from a state dict (the converters' entry point): fp32 weights + config.json, atomically."""
    folder, model = Path(folder), dataclasses.asdict(model_cfg)
    with atomic_path(folder, "export") as tmp:
        tmp.mkdir(parents=True)
        atomic_save_safetensors({k: v.float() for k, v in state.items()}, tmp / EXPORT_WEIGHTS,
                                metadata={"format": "pt", MODEL_METADATA: json.dumps(model)})
        config = {"format": "maskdit_ds", "version": 1, "model": model, **meta}
        atomic_write_text(tmp / EXPORT_CONFIG, json.dumps(config, indent=2))
    return folder


def step_name(step: int) -> str:
    """The folder name of a checkpoint tag or an export saved after `step` optimizer steps."""
    return f"{STEP_PREFIX}{step:07d}"


def step_of(name: str) -> int:
    return int(name[len(STEP_PREFIX):])


def step_folders(parent: Path) -> list[Path]:
    """The step_XXXXXXX folders in `parent` (a run's checkpoints/ or export/), oldest first; temporaries (a
    killed write's step_XXXXXXX.tmpNNN) and other names are left out."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    folders = [p for p in parent.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
               and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(folders, key=lambda p: step_of(p.name))


def find_export(path: Path) -> Path:
    """An export folder, or a run directory (its newest export)."""
    path = Path(path)
    if (path / EXPORT_CONFIG).is_file() and (path / EXPORT_WEIGHTS).is_file():
        return path
    exports = [e for e in step_folders(path / "export")
               if (e / EXPORT_WEIGHTS).is_file() and (e / EXPORT_CONFIG).is_file()]
    if not exports:
        raise FileNotFoundError(f"{path}: neither an export folder (config.json + model.safetensors) "
                                f"nor a run directory with export/step_* folders")
    return exports[-1]


def read_export_config(folder: Path) -> dict:
    """folder/config.json, checked: a maskdit_ds export whose "model" names a registered size and holds exactly
    build_denoiser's fields. A problem raises InputError naming the file."""
    from . import DENOISER_FIELDS
    from .registry import MODELS

    path = Path(folder) / EXPORT_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable JSON file ({one_line(err)})") from None
    if not isinstance(config, dict) or config.get("format") != "maskdit_ds" or not isinstance(config.get("model"),
                                                                                                dict):
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise InputError(f"{path} is not a maskdit_ds export config (format={found!r}, a \"model\" record needed)")
    model = config["model"]
    missing, unknown = [f for f in DENOISER_FIELDS if f not in model], sorted(set(model) - set(DENOISER_FIELDS))
    if missing or unknown:
        raise InputError(f"{path}: model record lacks {missing} / has unknown fields {unknown}; expected "
                         f"{list(DENOISER_FIELDS)}")
    if model["name"] not in MODELS:
        raise InputError(f"{path}: model.name {model['name']!r} is not a registered model; known: "
                         f"{', '.join(sorted(MODELS))}")
    patch = MODELS[model["name"]].patch_size
    for key in ("input_size", "in_channels", "num_classes"):
        if not isinstance(model[key], int) or isinstance(model[key], bool) or model[key] <= 0:
            raise InputError(f"{path}: model.{key} is {model[key]!r}, expected a positive integer")
    if model["input_size"] % patch:
        raise InputError(f"{path}: model.input_size {model['input_size']} is not a multiple of the patch size "
                         f"{patch} of {model['name']}")
    return config


def expected_shapes(model) -> dict[str, tuple]:
    """The state-dict keys and shapes of the denoiser `model` describes (build_denoiser's fields), built on the
    meta device: no memory for weights."""
    from . import build_denoiser

    with torch.device("meta"):
        net = build_denoiser(model)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def shape_problems(state: dict, expected: dict[str, tuple]) -> list[str]:
    """What keeps `state` from loading into a network with `expected` keys and shapes ([] when it fits)."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k}: expected {list(expected[k])}, found {list(state[k].shape)}"
             for k in sorted(set(state) & set(expected)) if tuple(state[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {', '.join(unexpected[:10])}"
                        f"{' ...' if len(unexpected) > 10 else ''}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches: " + "; ".join(wrong[:10]))
    return problems


def load_export_state(folder: Path, config: dict, device="cpu") -> dict:
    """folder/model.safetensors, checked before use against the network config.json describes: readable, every
    key and shape, and (exports written since the weights record it) the same model record, which catches an
    export of another input size (no weight's shape depends on it). A problem raises InputError naming the file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / EXPORT_WEIGHTS
    try:
        with safe_open(str(path), "pt") as f:
            recorded = (f.metadata() or {}).get(MODEL_METADATA)
        state = load_file(str(path), device=str(torch.device(device)))
    except Exception as err:  # SafetensorError (truncated, garbage), OSError: the file is not usable
        raise InputError(f"{path}: not a readable safetensors file ({one_line(err)})") from None
    model = config["model"]
    if recorded is not None and json.loads(recorded) != model:
        raise InputError(f"{path} holds weights of {json.loads(recorded)}, but {EXPORT_CONFIG} describes {model}")
    problems = shape_problems(state, expected_shapes(SimpleNamespace(**model)))
    if problems:
        raise InputError(f"{path} does not hold the {model['name']} weights {EXPORT_CONFIG} describes: "
                         + " | ".join(problems))
    return state


def check_export_matches(folder: Path, config: dict, wanted: dict) -> None:
    """Refuse an export whose model differs from `wanted` (build_denoiser's fields, e.g. the run's model config for
    train.init_from) on what its weights' meaning depends on; sigma_data may differ."""
    model = config["model"]
    differ = [f"{k} {model[k]!r} (wanted {wanted[k]!r})" for k in DENOISER_FIELDS_MATCHED if model[k] != wanted[k]]
    if differ:
        raise InputError(f"{Path(folder) / EXPORT_CONFIG} is an export of another model: {', '.join(differ)}")


def load_pretrained(path, device="cpu"):
    """EDMPrecond in eval mode from an export folder or a run directory; `net(x, sigma, class_labels)` -> D.
    The export is checked (config.json, every weight's key and shape) before it is used."""
    from . import build_denoiser

    folder = find_export(Path(path))
    config = read_export_config(folder)
    state = load_export_state(folder, config, device)  # checked: readable, every key and shape
    net = build_denoiser(SimpleNamespace(**config["model"]), device="meta")  # no random init, no memory
    net.load_state_dict(state, assign=True)  # the file's tensors become the parameters, already on `device`
    return net.to(device).eval().requires_grad_(False)  # .to: the fixed sin-cos tables, computed on device
