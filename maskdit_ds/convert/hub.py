"""Hub folders: an export folder made self-contained (config.json, model.safetensors, a model card), and the
upload with huggingface_hub."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from .. import dist
from ..io import atomic_path
from ..model.export import EXPORT_CONFIG, EXPORT_WEIGHTS, find_export, load_export_state, read_export_config
from .common import ConversionError, model_config_from, report


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
    folder = find_export(Path(source))
    config = read_export_config(folder)
    model_cfg = model_config_from(config["model"], str(folder / EXPORT_CONFIG))
    state = load_export_state(folder, config)  # checked against config.json before it is copied
    out = Path(out)
    if out.resolve() == folder.resolve():
        raise ConversionError(f"--out {out} is the source folder; choose a new folder")
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        shutil.copy2(folder / EXPORT_WEIGHTS, tmp / EXPORT_WEIGHTS)
        shutil.copy2(folder / EXPORT_CONFIG, tmp / EXPORT_CONFIG)
        card = MODEL_CARD.format(title=title or folder.name, params=sum(v.numel() for v in state.values()),
                                 weights=config.get("weights", "ema"), step=config.get("step", "?"),
                                 images_seen=config.get("images_seen", "?"), **dataclasses.asdict(model_cfg))
        (tmp / "README.md").write_text(card)
    report(f"hub {folder} -> {out}", [f"{len(state)} tensors copied unchanged; README.md model card written"])
    return out


def push_to_hub(folder: Path, repo_id: str, private: bool = False, token: str | None = None,
                message: str = "Upload MaskDiT weights") -> str:
    """Upload a Hub folder (make_hub_folder) with huggingface_hub; needs network access and a write token."""
    folder = Path(folder)
    for name in (EXPORT_CONFIG, EXPORT_WEIGHTS, "README.md"):
        if not (folder / name).is_file():
            raise ConversionError(f"{folder} has no {name}; build it with `python -m maskdit_ds convert hub` first")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    dist.say(f"[convert] pushed {folder} to {repo_id}: {info}")
    return str(info)
