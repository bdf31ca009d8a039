"""Checkpoint conversion into our export format (config.json + model.safetensors): ZeRO tags, the MaskDiT
paper's released .pt files, DiT's released weights (as an encoder initialisation), and Hub folders.

Every converter checks keys and shapes against a freshly built network (on the meta device) before writing,
prints what it mapped, and never unpickles anything but tensors, containers and argparse.Namespace.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from . import checkpoint as ckpt
from .config import ModelConfig
from .model import MODELS, build_denoiser
from .model.layers import sincos_2d_table

PREFIX = "model."  # EDMPrecond wraps the trunk as .model
REFERENCE_PREFIXES = ("_orig_mod.model.", "model.")  # torch.compile'd saves add _orig_mod.; longest first
FIXED_TABLES = ("pos_embed", "decoder_pos_embed")  # recomputed by our model, never stored
TABLE_TOLERANCE = 1e-6
# DiT (facebookresearch/DiT) parts that MaskDiT does not have or shapes differently: its final layer predicts
# p*p*2C (learned sigma) from width D, ours p*p*C from the decoder's width.
DIT_DROPPED = ("final_layer.",)
# MaskDiT parts that DiT has no weights for: they keep the fresh initialisation of build_denoiser.
DIT_FRESH = ("decoder_layer.", "decoder_blocks.", "mask_token", "final_layer.")


class ConversionError(ValueError):
    """The input cannot be converted; the message names the file, the key, and expected vs found."""


# ---------------------------------------------------------------- shared pieces


def expected_shapes(model_cfg: ModelConfig) -> dict[str, tuple]:
    """Our state-dict keys (with the `model.` prefix) and shapes, without allocating weights."""
    with torch.device("meta"):
        net = build_denoiser(model_cfg)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def check_state(state: dict, expected: dict[str, tuple], source: str) -> None:
    """Fail before writing anything when keys are missing, unexpected, or shaped differently."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
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
    if problems:
        raise ConversionError(f"{source}: " + " | ".join(problems))


def write_export(folder: Path, state: dict, model_cfg: ModelConfig, meta: dict) -> Path:
    """checkpoint.export_state of an imported state dict, whose tensors may share storage (safetensors refuses
    that), so each is cloned first; .float() keeps fp32 bits unchanged."""
    return ckpt.export_state(folder, {k: v.detach().float().clone().contiguous() for k, v in state.items()},
                             model_cfg, meta)


def report(title: str, lines: list[str]) -> None:
    print(f"[convert] {title}", flush=True)
    for line in lines:
        print(f"  {line}", flush=True)


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


# ---------------------------------------------------------------- a. ZeRO tags of our runs


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
    from .engine import consolidated_fp32_state, unsafe_file  # imports deepspeed: only when this converter runs

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
            "source": {"kind": "zero", "tag": str(tag_dir.resolve()), "world_size": manifest.get("world_size")}}
    kinds = ["ema", "model"] if weights == "both" else [weights]
    written = []
    for kind in kinds:
        if kind == "ema":
            state = load_file(str(tag_dir / "ema.safetensors"))
        else:
            state = consolidated_fp32_state(tag_dir)
        check_state(state, expected, f"{tag_dir} ({kind} weights)")
        folder = Path(out) / kind if weights == "both" else Path(out)
        write_export(folder, state, model_cfg, {**meta, "weights": kind})
        report(f"zero {tag_dir} -> {folder}", [f"{len(state)} tensors ({kind} weights, "
               f"{sum(v.numel() for v in state.values()):,} parameters), model {model_cfg.name}, "
               f"step {meta['step']}, saved on {manifest.get('world_size')} ranks; keys unchanged"])
        written.append(folder)
    return written


# ---------------------------------------------------------------- b. the paper's released checkpoints


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


def convert_reference(path: Path, out: Path, use: str = "ema", model: str | None = None,
                      input_size: int | None = None) -> Path:
    """A released MaskDiT .pt ({'model','ema','opt','args'}, keys 'model.'/'_orig_mod.model.') -> export."""
    path = Path(path)
    state, args = load_foreign(path, use)
    bare, counts = strip_prefixes(state, REFERENCE_PREFIXES, str(path))
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


def to_reference_layout(state: dict, model_cfg: ModelConfig, prefix: str = "model.") -> dict:
    """Our state dict -> the released layout (prefix + the fixed tables it stores). Inverse of the import."""
    size = MODELS[model_cfg.name]
    grid = model_cfg.input_size // size.patch_size
    out = {prefix + k[len(PREFIX):]: v for k, v in state.items()}
    out[prefix + "pos_embed"] = sincos_2d_table(size.hidden_size, grid)
    out[prefix + "decoder_pos_embed"] = sincos_2d_table(size.decoder_hidden, grid)
    return out


# ---------------------------------------------------------------- c. DiT as an encoder initialisation


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


# ---------------------------------------------------------------- d. Hugging Face Hub folders


MODEL_CARD = """---
library_name: maskdit_ds
tags:
- diffusion
- maskdit
- class-conditional
- image-generation
---

# {name} ({title})

MaskDiT (Zheng et al., "Fast Training of Diffusion Models with Masked Transformers", TMLR 2024): a DiT
encoder over visible tokens and an 8-block decoder, with EDM preconditioning (sigma_data {sigma_data}).

| field | value |
|---|---|
| model | {name} |
| input | {in_channels} x {input_size} x {input_size} |
| classes | {num_classes} |
| parameters | {params:,} (without the fixed sin-cos tables, which are recomputed) |
| weights | {weights} |
| training step | {step} |
| images seen | {images_seen} |

## Use

```python
from maskdit_ds import load_pretrained
net = load_pretrained("path/to/this/folder")  # or huggingface_hub.snapshot_download(repo_id)
denoised = net(x, sigma, class_labels)      # D(x; sigma), float32
```

Files: `config.json` (model arguments, provenance) and `model.safetensors` (float32 weights, keys
under `model.`). Loading needs no network access and no pickles.
"""


def make_hub_folder(source: Path, out: Path, title: str = "") -> Path:
    """An export folder (or a run directory: its newest export) -> a self-contained Hub folder with a card."""
    folder = ckpt.find_export(Path(source))
    config = ckpt.read_export_config(folder)
    model_cfg = model_config_from(config["model"], str(folder / ckpt.EXPORT_CONFIG))
    state = load_file(str(folder / ckpt.EXPORT_WEIGHTS))
    check_state(state, expected_shapes(model_cfg), str(folder / ckpt.EXPORT_WEIGHTS))
    out = Path(out)
    if out.resolve() == folder.resolve():
        raise ConversionError(f"--out {out} is the source folder; choose a new folder")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(folder / ckpt.EXPORT_WEIGHTS, tmp / ckpt.EXPORT_WEIGHTS)
    shutil.copy2(folder / ckpt.EXPORT_CONFIG, tmp / ckpt.EXPORT_CONFIG)
    card = MODEL_CARD.format(title=title or folder.name, params=sum(v.numel() for v in state.values()),
                             weights=config.get("weights", "ema"), step=config.get("step", "?"),
                             images_seen=config.get("images_seen", "?"), **dataclasses.asdict(model_cfg))
    (tmp / "README.md").write_text(card)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    report(f"hub {folder} -> {out}", [f"{len(state)} tensors copied unchanged; README.md model card written"])
    return out


def push_to_hub(folder: Path, repo_id: str, private: bool = False, token: str | None = None,
                message: str = "Upload MaskDiT weights") -> str:
    """Upload a Hub folder (make_hub_folder) with huggingface_hub; needs network access and a write token."""
    folder = Path(folder)
    for name in (ckpt.EXPORT_CONFIG, ckpt.EXPORT_WEIGHTS, "README.md"):
        if not (folder / name).is_file():
            raise ConversionError(f"{folder} has no {name}; build it with `convert_checkpoint.py hub` first")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    print(f"[convert] pushed {folder} to {repo_id}: {info}", flush=True)
    return str(info)
