"""Our own ZeRO checkpoint tags (any world size and precision) -> export folders: the EMA, or the fp32 master
weights consolidated by DeepSpeed's own routine (through training/engine.py, with its loads made safe)."""
from __future__ import annotations

import json
from pathlib import Path

import yaml
from safetensors.torch import load_file

from ..config import ModelConfig
from ..model.align import denoiser_state
from ..model.export import expected_shapes
from .common import ConversionError, check_state, model_config_from, report, write_export


def run_model_config(tag_dir: Path) -> ModelConfig:
    """The model section of run_dir/config.yaml (tag_dir = run_dir/checkpoints/step_XXXXXXX)."""
    path = Path(tag_dir).resolve().parent.parent / "config.yaml"
    if not path.is_file():
        raise ConversionError(f"{path} not found: a tag must sit in <run_dir>/checkpoints/ next to the run's "
                              f"config.yaml")
    values = yaml.safe_load(path.read_text()) or {}
    if "model" not in values:
        raise ConversionError(f"{path}: no model section")
    return model_config_from(values["model"], str(path))


def convert_zero(tag_dir: Path, out: Path, weights: str = "ema") -> list[Path]:
    """A ZeRO tag of our runs (any world size and precision) -> export folder(s).

    weights: ema (tag/ema.safetensors), model (the fp32 master weights consolidated by DeepSpeed's own
    zero_to_fp32 routine), or both (out/ema and out/model).
    """
    from ..training import checkpoint as ckpt  # imports deepspeed: only when this converter runs
    from ..training.engine import consolidated_fp32_state, unsafe_file

    tag_dir = Path(tag_dir)
    if weights not in ("ema", "model", "both"):
        raise ConversionError(f"--weights must be ema, model or both, got {weights!r}")
    problem = ckpt.check_tag(tag_dir, verify_hashes=True, verify_loads=unsafe_file)
    if problem:
        raise ConversionError(f"{tag_dir} is not a complete checkpoint: {problem}")
    model_cfg = run_model_config(tag_dir)
    expected = expected_shapes(model_cfg)
    manifest = json.loads((tag_dir / ckpt.MANIFEST).read_text())
    rank0 = ckpt.load_rank_state(tag_dir, 0)["train"]
    meta = {"step": manifest.get("step", rank0["step"]), "images_seen": rank0.get("images_seen", 0),
            "device_hours": rank0.get("device_hours", 0.0),
            "source": {"kind": "zero", "tag": str(tag_dir.resolve()), "world_size": manifest.get("world_size")}}
    kinds = ["ema", "model"] if weights == "both" else [weights]
    written = []
    for kind in kinds:
        if kind == "ema":
            state = load_file(str(tag_dir / ckpt.EMA_FILE))
        else:
            state = denoiser_state(consolidated_fp32_state(tag_dir))  # an aligned run's projector is dropped
        check_state(state, expected, f"{tag_dir} ({kind} weights)")
        folder = Path(out) / kind if weights == "both" else Path(out)
        write_export(folder, state, model_cfg, {**meta, "weights": kind})
        report(f"zero {tag_dir} -> {folder}", [f"{len(state)} tensors ({kind} weights, "
               f"{sum(v.numel() for v in state.values()):,} parameters), model {model_cfg.name}, "
               f"step {meta['step']}, saved on {manifest.get('world_size')} ranks; keys unchanged"])
        written.append(folder)
    return written
