"""Generate N images into an ADM .npz (arr_0 uint8 NHWC, arr_1 int64 labels), over any number of ranks, resumably.

Image i always uses seed `first_seed + i` (noise, then its class, from that seed's own generator; see
diffusion/sampler.py),
so the file does not depend on the rank count or batch size. Work is cut into chunks of consecutive images; each
finished chunk is written atomically to <out>/chunks/, so a killed run redoes only unfinished chunks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import dist, io
from ..config import PRECISIONS, SamplerConfig
from ..data.transforms import image_grid, to_uint8
from ..data.vae import decode, load_decoder
from ..diffusion.sampler import sample_seeds
from ..diffusion.solvers import SOLVERS
from ..evaluation.npz_io import NpzImages
from ..hardware import DTYPES, sampling_precision
from ..model.export import find_export, load_pretrained, read_export_config

LATENT_CHANNELS = 4  # SD KL-f8 latents; other channel counts are pixels
CLASS_MODES = ("random", "balanced")
PLAN_FILE, NPZ_FILE, JSON_FILE, GRID_FILE = "plan.json", "samples.npz", "samples.json", "samples.png"


@dataclass
class GenerateConfig:
    num_images: int = 50_000
    first_seed: int = 0  # image i uses seed first_seed + i
    class_mode: str = "random"  # random: uniform from each seed's generator | balanced: equal counts, shuffled
    batch_size: int = 64  # images per network batch per rank
    chunk_size: int = 1000  # images per resumable chunk file
    rounding: str = "floor"  # floor((x+1) 127.5) like the reference; round: 127.5 x + 128 (DiT)
    vae: str = ""  # diffusers AutoencoderKL folder / file / hub id; needed for latent models only
    latent_scale: float = 0.18215
    vae_batch: int = 16  # decode batch; halved on out-of-memory
    grid: int = 100  # images in samples.png (0: none)
    keep_chunks: bool = False  # keep <out>/chunks after the .npz is written
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # steps, guidance, precision, ...


def run_generate_config(cfg, batch_size: int) -> GenerateConfig:
    """A training run's sampler (cfg.sample) and decoder (cfg.data) as a GenerateConfig: what in-training FID and
    the final samples use."""
    return GenerateConfig(batch_size=batch_size, vae=cfg.data.vae if cfg.data.kind.latent else "",
                          latent_scale=cfg.data.latent_scale, sampler=cfg.sample.sampler())


# ---------------------------------------------------------------- inputs


def balanced_labels(num_images: int, num_classes: int, seed: int) -> np.ndarray:
    """(N,) int64: class c appears floor or ceil of N/K times, in a seeded random order (a class-sorted file would
    cap ADM's Inception Score, whose splits are contiguous)."""
    labels = np.arange(num_images, dtype=np.int64) % num_classes
    return np.random.default_rng(seed).permutation(labels)


def model_source(path) -> tuple[Path, dict, dict]:
    """(export folder, its config.json, the run's data config or {}) from an export folder or a run directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such export folder or run directory")
    folder = find_export(path)
    config = read_export_config(folder)
    run_yaml = next((p for p in (path / "config.yaml", folder.parent.parent / "config.yaml") if p.is_file()), None)
    data = {}
    if run_yaml is not None:
        import yaml

        data = (yaml.safe_load(run_yaml.read_text()) or {}).get("data", {}) or {}
    return folder, config, data


def check_config(gcfg: GenerateConfig, model: dict) -> None:
    """Every problem with the request, before any network is built."""
    problems = []
    if gcfg.num_images <= 0:
        problems.append(f"num_images must be positive, got {gcfg.num_images}")
    if gcfg.class_mode not in CLASS_MODES:
        problems.append(f"class_mode must be one of {CLASS_MODES}, got {gcfg.class_mode!r}")
    if gcfg.sampler.precision not in PRECISIONS:
        problems.append(f"precision must be one of {PRECISIONS}, got {gcfg.sampler.precision!r}")
    if gcfg.rounding not in ("floor", "round"):
        problems.append(f"rounding must be floor or round, got {gcfg.rounding!r}")
    for key in ("batch_size", "chunk_size", "vae_batch", "first_seed"):
        if getattr(gcfg, key) < (0 if key == "first_seed" else 1):
            problems.append(f"{key} must be {'>= 0' if key == 'first_seed' else 'positive'}, got {getattr(gcfg, key)}")
    if gcfg.sampler.steps < 1:
        problems.append(f"sampler steps must be >= 1, got {gcfg.sampler.steps}")
    if gcfg.sampler.solver not in SOLVERS:
        problems.append(f"solver must be one of {SOLVERS.known()}, got {gcfg.sampler.solver!r}")
    if model.get("in_channels") == LATENT_CHANNELS and not gcfg.vae:
        problems.append(f"model {model.get('name')} works on {LATENT_CHANNELS}-channel latents: pass a VAE "
                        "(--vae: diffusers AutoencoderKL folder, SD VAE file or hub id) to decode them")
    if problems:
        raise ValueError("generate: " + "; ".join(problems))


def settings_record(gcfg: GenerateConfig, folder: Path, export_cfg: dict) -> dict:
    """What decides the pixels: must match between a killed run and its resume; also written to samples.json."""
    sampler = {k: (str(v) if isinstance(v, float) and math.isinf(v) else v)
               for k, v in dataclasses.asdict(gcfg.sampler).items()}
    sampler["guidance_interval"] = [str(v) if math.isinf(v) else v for v in gcfg.sampler.guidance_interval]
    return {
        "model": str(folder.resolve()), "model_config": export_cfg.get("model"), "step": export_cfg.get("step"),
        "num_images": gcfg.num_images, "seeds": [gcfg.first_seed, gcfg.first_seed + gcfg.num_images],
        "class_mode": gcfg.class_mode, "chunk_size": gcfg.chunk_size, "precision": gcfg.sampler.precision,
        "solver_dtype": "float64", "rounding": gcfg.rounding, "vae": gcfg.vae or None,
        "latent_scale": gcfg.latent_scale if gcfg.vae else None, "sampler": sampler,
        # what the model cost to train (quality against compute: `python -m maskdit_ds report`)
        "training": {k: export_cfg.get(k) for k in ("run", "step", "images_seen", "device_hours")},
    }


# ---------------------------------------------------------------- decoding


def to_pixels(samples: torch.Tensor, vae, gcfg: GenerateConfig) -> np.ndarray:
    """Sampler output (float64 latents or pixels in [-1, 1]) -> uint8 (N, H, W, 3)."""
    if vae is not None:
        samples, gcfg.vae_batch = decode(vae, samples.float(), gcfg.latent_scale, gcfg.vae_batch)
    return to_uint8(samples.float(), gcfg.rounding)


def autocast(precision: str, device: torch.device):
    """The network's matmuls in `precision` (auto resolved here); fp32 runs without autocast."""
    precision = sampling_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def sample_pixels(net, seeds, labels, shape, gcfg: GenerateConfig, device, vae=None,
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, H, W, 3) and int64 (N,) labels for these seeds; shape = the network's (C, h, w);
    labels=None draws each class from its seed's generator."""
    with autocast(gcfg.sampler.precision, torch.device(device)):
        out, drawn = sample_seeds(net, list(seeds), shape, net.num_classes, gcfg.sampler, device,
                                  class_labels=labels, batch_size=gcfg.batch_size, progress=progress)
    return to_pixels(out, vae, gcfg), drawn.numpy().astype(np.int64)


# ---------------------------------------------------------------- chunks on disk


def chunk_path(out: Path, index: int) -> Path:
    return out / "chunks" / f"chunk_{index:06d}.npz"


def chunk_done(out: Path, index: int, expected: int) -> bool:
    path = chunk_path(out, index)
    if not path.is_file():
        return False
    try:
        with np.load(path) as z:
            return z["labels"].shape == (expected,) and z["images"].shape[0] == expected
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return False  # a torn file from a kill is redone


def write_chunk(out: Path, index: int, images: np.ndarray, labels: np.ndarray, seeds) -> None:
    path = chunk_path(out, index)
    io.atomic_save_npz(path, images=images, labels=labels, seeds=np.asarray(seeds, dtype=np.int64))


def write_adm_npz(path: Path, chunk_files: list[Path], total: int) -> np.ndarray:
    """Stream the chunks into one .npz (stored, zip64) without holding all images: arr_0 uint8 (N, H, W, 3),
    arr_1 int64 (N,), which is returned. np.load and ADM's header-parsing reader both read it."""
    image_shape = NpzImages(chunk_files[0], key="images").shape[1:]  # the .npy header only
    labels = []
    with io.atomic_path(path, "samples") as tmp, \
            zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as member:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                      "shape": (total, *image_shape)}
            np.lib.format.write_array_header_1_0(member, header)
            for chunk in chunk_files:
                with np.load(chunk) as z:
                    member.write(np.ascontiguousarray(z["images"]).tobytes())
                    labels.append(z["labels"])
        labels = np.concatenate(labels).astype(np.int64)
        with zf.open("arr_1.npy", "w") as member:
            np.lib.format.write_array(member, labels)
    return labels


# ---------------------------------------------------------------- the run


def already_complete(out: Path, record: dict) -> bool:
    if not ((out / NPZ_FILE).is_file() and (out / JSON_FILE).is_file()):
        return False
    prior = json.loads((out / JSON_FILE).read_text())
    return {k: prior.get(k) for k in record} == record


def prepare_out(out: Path, record: dict) -> None:
    """Rank 0: create the folders and the plan; refuse to mix chunks made with other settings."""
    plan = out / PLAN_FILE
    (out / "chunks").mkdir(parents=True, exist_ok=True)
    if plan.is_file():
        old = json.loads(plan.read_text())
        diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
        if diff:
            raise ValueError(f"{out} holds chunks made with other settings ({', '.join(diff)} differ, e.g. "
                             f"{diff[0]}: {old.get(diff[0])!r} there vs {record.get(diff[0])!r} now); "
                             "use another --out or delete it")
    else:
        io.atomic_write_text(plan, json.dumps(record, indent=2))


def run_generation(model_path, out, gcfg: GenerateConfig, progress: bool = True) -> Path | None:
    """Collective over all ranks. Returns <out>/samples.npz on rank 0 (None elsewhere)."""
    out = Path(out)
    folder, export_cfg, data = model_source(model_path)
    if not gcfg.vae and data.get("vae"):
        gcfg.vae, gcfg.latent_scale = data["vae"], float(data.get("latent_scale", gcfg.latent_scale))
    check_config(gcfg, export_cfg["model"])
    device = dist.init_process_group()
    gcfg.sampler.precision = sampling_precision(gcfg.sampler.precision)  # recorded as what ran (resume must match)
    record = settings_record(gcfg, folder, export_cfg)
    if dist.broadcast_from_main(already_complete(out, record) if dist.is_main() else None):
        dist.say(f"[generate] {out / NPZ_FILE} is already complete with these settings")
        return out / NPZ_FILE if dist.is_main() else None
    error = None
    if dist.is_main():
        try:
            prepare_out(out, record)
        except ValueError as e:
            error = str(e)
    error = dist.broadcast_from_main(error)
    if error:
        raise ValueError(error)

    n, size = gcfg.num_images, gcfg.chunk_size
    chunks = [(k, min(size, n - k * size)) for k in range(math.ceil(n / size))]
    missing = dist.broadcast_from_main([k for k, count in chunks if not chunk_done(out, k, count)]
                                  if dist.is_main() else None)
    net = load_pretrained(folder, device)
    vae, vae_info = load_decoder(gcfg.vae, device, gcfg.sampler.precision)  # resolved above
    labels_all = (balanced_labels(n, net.num_classes, gcfg.first_seed) if gcfg.class_mode == "balanced" else None)

    model = export_cfg["model"]
    shape = (model["in_channels"], model["input_size"], model["input_size"])
    mine = missing[dist.rank()::dist.world_size()]
    start = time.time()
    bar = tqdm(total=n, initial=n - sum(chunks[k][1] for k in missing), unit="img", dynamic_ncols=True,
               disable=not (progress and dist.is_main()), desc="generate")
    for k in mine:
        first = k * size
        seeds = range(gcfg.first_seed + first, gcfg.first_seed + first + chunks[k][1])
        given = None if labels_all is None else torch.from_numpy(labels_all[first:first + chunks[k][1]])
        images, labels = sample_pixels(net, seeds, given, shape, gcfg, device, vae)
        write_chunk(out, k, images, labels, seeds)
        bar.update(min(chunks[k][1] * dist.world_size(), bar.total - bar.n))  # rank 0's view, times the ranks
    bar.close()
    elapsed = time.time() - start
    dist.long_barrier()  # ranks finish their last chunk at different times; a chunk may outlast the pg timeout
    generated = sum(chunks[k][1] for k in missing)
    if not dist.is_main():
        return None
    return finish(out, chunks, record, vae_info, gcfg, generated, elapsed)


def finish(out: Path, chunks, record: dict, vae_info, gcfg: GenerateConfig, generated: int, elapsed: float) -> Path:
    """Rank 0: check every chunk, stream them into samples.npz, write samples.json (and samples.png)."""
    bad = [k for k, count in chunks if not chunk_done(out, k, count)]
    if bad:
        raise RuntimeError(f"{out}/chunks: chunks {bad[:10]} are missing or incomplete after generation")
    files = [chunk_path(out, k) for k, _ in chunks]
    npz = out / NPZ_FILE
    labels = write_adm_npz(npz, files, gcfg.num_images)
    firsts = []
    for f in files[:math.ceil(min(max(gcfg.grid, 1), gcfg.num_images) / gcfg.chunk_size)]:
        with np.load(f) as z:
            firsts.append(z["images"])
    firsts = np.concatenate(firsts)
    if gcfg.grid:
        from PIL import Image

        io.atomic_save_image(Image.fromarray(image_grid(firsts[:gcfg.grid])), out / GRID_FILE)
    counts = np.bincount(labels, minlength=record["model_config"]["num_classes"]).tolist()
    report = {**record, "arr_0_shape": [gcfg.num_images, *firsts.shape[1:]], "class_counts": counts, "vae_info": vae_info,
              "this_invocation": {"images": generated, "seconds": round(elapsed, 3), "world_size": dist.world_size(),
                                  "images_per_s": round(generated / elapsed, 3) if elapsed > 0 and generated else None}}
    io.atomic_write_text(out / JSON_FILE, json.dumps(report, indent=2))
    if not gcfg.keep_chunks:
        shutil.rmtree(out / "chunks", ignore_errors=True)
    return npz
