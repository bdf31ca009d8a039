"""VAE latent cache of MaskDiT (docs/method.md §5): sharded, resumable encoding to Arrow shards, validation, the reader, sample_latent.

Layout of a cache directory:
  plan.json              settings that every shard must share (written before any work)
  shards/shard-00012/    one `datasets` save_to_disk folder per block of `shard_size` source images,
                         plus shard.json (its rows and skipped images); written to a temp dir, then renamed
  skipped.jsonl          {"index", "name", "reason"} per skipped source image (after validation)
  meta.json              plan + counts + "status": "complete" (after validation; LatentCache needs it)
Shard k covers source indices [k * shard_size, (k + 1) * shard_size) and belongs to rank k % world_size,
so a resumed run, even with another world size, redoes only shards that were never renamed into place.
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import dist
from ..io import atomic_write_json, atomic_write_text, storage_guard
from .sources import BadImage
from .transforms import adm_center_crop
from .vae import encode_moments

FORMAT_VERSION = 1
SHARDS = "shards"
MOMENT_DTYPES = ("float16", "float32")


# ----------------------------------------------------------------------------------------------------
# Training-time use: the reader and the fresh latent draw.

def sample_latent(moments: torch.Tensor, generator: torch.Generator = None, scale: float = 0.18215) -> torch.Tensor:
    """Posterior moments (B, 2C, h, w) -> a fresh latent draw (B, C, h, w) float32, times the SD scale:
    (mean + exp(0.5 * clamp(logvar, -30, 20)) * eps) * scale, computed in float32 on the moments' device."""
    mean, logvar = moments.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
    return (mean + std * eps) * scale


class LatentCache(torch.utils.data.Dataset):
    """Map-style dataset over a finished cache: item i -> {"x": float32 (2C, h, w) moments, "y": int64}.
    The Arrow shards are memory-mapped through `datasets`; .meta holds the cache's meta.json."""

    def __init__(self, path: str | Path):
        import datasets

        self.path = Path(path).absolute()
        self.meta = read_meta(self.path)
        shards = [datasets.load_from_disk(str(self.path / SHARDS / shard_name(k)))
                  for k in range(self.meta["num_shards"])]
        data = datasets.concatenate_datasets(shards) if len(shards) > 1 else shards[0]
        if len(data) != self.meta["count"]:
            raise ValueError(f"latent cache {self.path}: meta.json says {self.meta['count']} rows, shards hold {len(data)}")
        self.data = data.with_format("numpy", columns=["moments", "label"])

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        row = self.data[int(i)]
        # np.array copies: Arrow-backed arrays are read-only, and float16 moments become float32 here.
        return {"x": torch.from_numpy(np.array(row["moments"], dtype=np.float32)),
                "y": torch.tensor(int(row["label"]), dtype=torch.int64)}

    def __getitems__(self, indices) -> list:
        # DataLoader calls this with a whole batch of indices: one Arrow gather instead of B row reads.
        rows = self.data[[int(i) for i in indices]]
        x = torch.from_numpy(np.array(rows["moments"], dtype=np.float32))
        y = torch.from_numpy(np.asarray(rows["label"]).astype(np.int64))
        return [{"x": x[j], "y": y[j]} for j in range(len(indices))]

    def labels(self) -> torch.Tensor:
        """All labels as int64 (N,), read through Arrow (for class filtering without touching the moments)."""
        col = self.data.select_columns(["label"]).with_format("arrow")[:]["label"]
        return torch.from_numpy(np.array(col, dtype=np.int64))  # a writable copy

    def check_compatible(self, resolution: int, channels: int) -> None:
        """Refuse a cache made for another resolution or latent channel count than the config's."""
        r, c, h = self.meta["resolution"], self.meta["latent_channels"], self.meta["latent_size"]
        if r != resolution or c != channels:
            raise ValueError(f"latent cache {self.path} holds {c}-channel {h}x{h} latents of {r} px images, "
                             f"but the config asks for resolution {resolution} with {channels} latent channels; "
                             f"point data.path at a matching cache or make one with tools/cache_latents.py")


def read_meta(path: str | Path) -> dict:
    meta_file = Path(path) / "meta.json"
    if not meta_file.is_file():
        if (Path(path) / "plan.json").is_file():
            done = len(finished_shards(path))
            total = json.loads((Path(path) / "plan.json").read_text())["num_shards"]
            raise ValueError(f"latent cache {path} is incomplete ({done} of {total} shards, not validated); "
                             f"re-run tools/cache_latents.py with the same arguments to finish it")
        raise FileNotFoundError(f"{path} is not a latent cache (no meta.json)")
    meta = json.loads(meta_file.read_text())
    if meta.get("status") != "complete" or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"latent cache {path}: status {meta.get('status')!r}, format {meta.get('format_version')} "
                         f"(expected complete, {FORMAT_VERSION})")
    return meta


# ----------------------------------------------------------------------------------------------------
# Layout, plan and atomic shard writes (shared with reference_import).

def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def shard_range(k: int, plan: dict) -> range:
    size = plan["shard_size"]
    return range(k * size, min((k + 1) * size, plan["num_images"]))


def finished_shards(out: str | Path) -> set:
    folder = Path(out) / SHARDS
    if not folder.is_dir():
        return set()
    return {int(e.name[6:]) for e in folder.iterdir() if e.name.startswith("shard-") and e.name[6:].isdigit()}


def rank_and_world(rank: int = None, world_size: int = None) -> tuple[int, int]:
    """Explicit arguments, else what dist.py reads from the launcher (torchrun, deepspeed or srun)."""
    rank = dist.rank() if rank is None else rank
    world_size = dist.world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return rank, world_size


def prepare_cache(out: str | Path, plan: dict) -> None:
    """Write plan.json, or check that an existing one (from an earlier or a parallel rank's run) agrees."""
    (Path(out) / SHARDS).mkdir(parents=True, exist_ok=True)
    plan_file = Path(out) / "plan.json"
    if not plan_file.exists():
        atomic_write_json(plan_file, plan, indent=1)  # every rank writes the same content: the race is harmless
    old = json.loads(plan_file.read_text())
    diff = {k: (old.get(k), plan.get(k)) for k in set(old) | set(plan) if old.get(k) != plan.get(k)}
    if diff:
        lines = "; ".join(f"{k}: cache has {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"cache directory {out} was started with other settings ({lines}); "
                         f"use a new --out or the original settings")


def features(plan: dict):
    import datasets

    c, h = 2 * plan["latent_channels"], plan["latent_size"]
    return datasets.Features({"moments": datasets.Array3D((c, h, h), plan["moments_dtype"]),
                              "label": datasets.Value("int64"), "index": datasets.Value("int64"),
                              "flip": datasets.Value("bool")})


def write_shard(out: str | Path, k: int, plan: dict, moments: np.ndarray, labels, indices, flips, skipped: list) -> None:
    """Write shard k atomically: save_to_disk into a temp dir, then rename it into place.
    moments (n, 2C, h, w) already in the plan's dtype; skipped: [{"index", "name", "reason"}]."""
    import datasets

    final = Path(out) / SHARDS / shard_name(k)
    tmp = Path(out) / SHARDS / f".tmp-{shard_name(k)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    ds = datasets.Dataset.from_dict({"moments": moments, "label": np.asarray(labels, np.int64),
                                     "index": np.asarray(indices, np.int64), "flip": np.asarray(flips, bool)},
                                    features=features(plan))
    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # its per-shard "Saving the dataset" bar would break the encode bar
    try:
        with storage_guard(final, "latent cache shard", cleanup=tmp):
            ds.save_to_disk(str(tmp))
            atomic_write_json(tmp / "shard.json", {"rows": len(ds), "skipped": skipped}, indent=1)
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    try:
        tmp.rename(final)
    except OSError:  # another process finished the same shard first; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise


def remove_stale_tmp(out: str | Path, shards) -> None:
    """Drop half-written temp dirs of the given shards left by a killed run."""
    mine = {shard_name(k) for k in shards}
    for e in (Path(out) / SHARDS).iterdir():
        if e.name.startswith(".tmp-") and e.name[5:16] in mine:
            shutil.rmtree(e, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# Validation and the final meta.json.

def wait_for_shards(out: str, plan: dict, timeout: float = None, poll: float = 2.0) -> None:
    """Rank 0 waits here for the other ranks' shards (a file barrier: no process group needed, so it
    works the same under torchrun, deepspeed, srun or separate array jobs)."""
    start, last_note = time.time(), time.time()
    while True:
        missing = sorted(set(range(plan["num_shards"])) - finished_shards(out))
        if not missing:
            return
        if timeout is not None and time.time() - start > timeout:
            raise TimeoutError(f"cache {out}: shards {missing[:10]} (of {len(missing)} missing) did not appear "
                               f"within {timeout} s; re-run with the same arguments to finish them")
        if time.time() - last_note > 60:
            dist.say(f"[cache] waiting for {len(missing)} shards from other ranks, e.g. {shard_name(missing[0])}")
            last_note = time.time()
        time.sleep(poll)


def _check_shard(out: str | Path, k: int, plan: dict, num_classes: int, chunk: int = 1024) -> list:
    """Validate one shard against its index range; return its skipped records."""
    import datasets

    where = Path(out) / SHARDS / shard_name(k)
    record = json.loads((where / "shard.json").read_text())
    ds = datasets.load_from_disk(str(where)).with_format("numpy")
    skipped = record["skipped"]
    want = set(shard_range(k, plan)) - {s["index"] for s in skipped}
    copies = plan["copies"]
    if len(ds) != record["rows"] or len(ds) != len(want) * copies:
        raise ValueError(f"{where}: {len(ds)} rows, expected {len(want)} images x {copies} copies "
                         f"({len(skipped)} skipped) and shard.json says {record['rows']}")
    cols = ds.select_columns(["index", "label"])[:]
    index, labels = cols["index"], cols["label"]
    found, times = np.unique(index, return_counts=True)
    if set(found.tolist()) != want or (times != copies).any():
        raise ValueError(f"{where}: source indices do not match the shard's range minus the skipped images")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{where}: labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes})")
    for s in range(0, len(ds), chunk):
        m = ds[s:s + chunk]["moments"]
        if not np.isfinite(m).all():
            bad = s + int(np.argwhere(~np.isfinite(m).reshape(len(m), -1).all(1))[0, 0])
            raise ValueError(f"{where}: row {bad} (source index {index[bad]}) has NaN or Inf moments")
    return skipped


def finalize_cache(out: str | Path, plan: dict) -> dict:
    """Validate every shard (count = (images - skipped) x copies, labels in range, no NaN/Inf),
    then write skipped.jsonl and meta.json. Idempotent."""
    skipped = []
    for k in range(plan["num_shards"]):
        skipped += _check_shard(out, k, plan, plan["num_classes"])
    count = (plan["num_images"] - len(skipped)) * plan["copies"]
    atomic_write_text(Path(out) / "skipped.jsonl",
                      "".join(json.dumps(s) + "\n" for s in sorted(skipped, key=lambda s: s["index"])))
    meta = dict(plan, count=count, num_skipped=len(skipped), status="complete")
    atomic_write_json(Path(out) / "meta.json", meta, indent=1)
    return meta


# ----------------------------------------------------------------------------------------------------
# Encoding images to a cache.

class _CropDataset(torch.utils.data.Dataset):
    """Source index -> (uint8 (3, res, res) or None, label, index, skip reason or None)."""

    def __init__(self, source, resolution: int):
        self.source, self.resolution = source, resolution

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        try:
            arr = adm_center_crop(self.source.load(i), self.resolution)
        except BadImage as e:
            return None, self.source.label(i), i, e.reason
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), self.source.label(i), i, None


def _collate(items):
    good = [it for it in items if it[0] is not None]
    bad = [(it[2], it[3]) for it in items if it[0] is None]
    x = torch.stack([it[0] for it in good]) if good else None
    return x, [it[1] for it in good], [it[2] for it in good], bad


def make_plan(source, vae_info: dict, resolution: int, flip: bool, moments_dtype: str, shard_size: int) -> dict:
    if resolution % vae_info["downsample"]:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's downsampling factor {vae_info['downsample']}")
    if len(source) == 0:
        raise ValueError(f"data source {source.describe()['path']} has no images")
    return cache_plan(resolution, vae_info, moments_dtype, list(source.label_names), source.describe(), len(source),
                      shard_size, flip)


def cache_plan(resolution: int, vae_info: dict, moments_dtype: str, label_names: list, source_desc: dict,
               num_images: int, shard_size: int, flip: bool = False) -> dict:
    """plan.json: everything a resumed or parallel run must agree on (encoded caches and imported releases)."""
    if moments_dtype not in MOMENT_DTYPES:
        raise ValueError(f"moments dtype must be one of {MOMENT_DTYPES}, got {moments_dtype!r}")
    return {
        "format_version": FORMAT_VERSION, "resolution": resolution, "crop": "adm_center",
        "latent_channels": vae_info["latent_channels"], "latent_size": resolution // vae_info["downsample"],
        "moments_dtype": moments_dtype, "vae": vae_info, "flip": flip, "copies": 2 if flip else 1,
        "label_names": label_names, "num_classes": len(label_names),
        "source": source_desc, "num_images": num_images, "shard_size": shard_size,
        "num_shards": max(1, -(-num_images // shard_size)),
    }


def encode_to_cache(source, vae, vae_info: dict, out: str, resolution: int, flip: bool = False,
                    moments_dtype: str = "float16", shard_size: int = 4096, batch_size: int = 64,
                    num_workers: int = 4, rank: int = None, world_size: int = None, max_shards: int = None,
                    wait_timeout: float = None, progress: bool = True) -> dict:
    """Encode this rank's missing shards of `source`; rank 0 then waits for all shards and validates.
    Returns {"status": "complete" | "partial" | "done_by_rank_0", "encoded": images this call, ...}."""
    rank, world_size = rank_and_world(rank, world_size)
    plan = make_plan(source, vae_info, resolution, flip, moments_dtype, shard_size)
    prepare_cache(out, plan)
    if (Path(out) / "meta.json").is_file():
        return {"status": "complete", "encoded": 0, "meta": read_meta(out)}
    done = finished_shards(out)
    todo = sorted(k for k in range(rank, plan["num_shards"], world_size) if k not in done)
    if max_shards is not None:
        todo = todo[:max_shards]
    remove_stale_tmp(out, todo)
    t0 = time.time()
    encoded = _encode_shards(source, vae, out, plan, todo, batch_size, num_workers, rank == 0 and progress)
    seconds = time.time() - t0
    summary = {"encoded": encoded, "seconds": seconds, "images_per_s": encoded / max(seconds, 1e-9),
               "shards_written": len(todo)}
    if max_shards is not None and len(finished_shards(out)) < plan["num_shards"]:
        return dict(summary, status="partial")
    if rank != 0:
        return dict(summary, status="done_by_rank_0")
    wait_for_shards(out, plan, wait_timeout)
    meta = finalize_cache(out, plan)
    return dict(summary, status="complete", meta=meta)


def _encode_shards(source, vae, out, plan, todo, batch_size, num_workers, show_progress) -> int:
    """Encode the listed shards; batches never cross a shard boundary, so each shard is written as soon as
    its last batch is done and a kill loses at most one shard of work."""
    batches = [list(r[s:s + batch_size]) for k in todo for r in [shard_range(k, plan)] for s in range(0, len(r), batch_size)]
    if not batches:
        return 0
    loader = torch.utils.data.DataLoader(
        _CropDataset(source, plan["resolution"]), batch_sampler=batches, num_workers=num_workers,
        collate_fn=_collate, pin_memory=vae.device.type == "cuda", persistent_workers=False)
    total = sum(len(shard_range(k, plan)) for k in todo)
    bar = _progress(total, show_progress)
    dtype = np.dtype(plan["moments_dtype"])
    shard_iter = iter(todo)
    k, rows, skipped, remaining, encoded = None, [], [], 0, 0
    for x, labels, indices, bad in loader:
        if remaining == 0:
            k = next(shard_iter)
            rows, skipped, remaining = [], [], len(shard_range(k, plan))
        skipped += [{"index": i, "name": source.name(i), "reason": r} for i, r in bad]
        if x is not None:
            rows.append(_encode_batch(vae, x, labels, indices, plan["flip"], dtype, source, skipped))
        n = len(indices) + len(bad)
        remaining -= n
        encoded += len(indices)
        bar.update(n)
        if remaining == 0:
            _write_rows(out, k, plan, rows, skipped)
    bar.close()
    return encoded


def _encode_batch(vae, x, labels, indices, flip, dtype, source, skipped):
    """uint8 (B, 3, H, W) -> rows (moments (n, 2C, h, w), labels, indices, flips), originals then their flips
    interleaved per image. An image whose moments are not finite (or overflow the storage dtype) is skipped."""
    x = x.to(vae.device, non_blocking=True).float() / 127.5 - 1.0
    if flip:
        x = torch.stack([x, torch.flip(x, dims=(-1,))], dim=1).flatten(0, 1)  # (2B, 3, H, W): i, flip(i), ...
    m = encode_moments(vae, x).cpu().numpy().astype(dtype)
    copies = 2 if flip else 1
    m = m.reshape(len(indices), copies, *m.shape[1:])
    ok = np.isfinite(m.reshape(len(indices), -1)).all(1)
    for j in np.flatnonzero(~ok):
        skipped.append({"index": indices[j], "name": source.name(indices[j]),
                        "reason": f"non-finite VAE moments (stored as {dtype.name})"})
    keep = np.flatnonzero(ok)
    lab = np.repeat(np.asarray(labels, np.int64)[keep], copies)
    idx = np.repeat(np.asarray(indices, np.int64)[keep], copies)
    flips = np.tile(np.arange(copies) == 1, len(keep))
    return m[keep].reshape(-1, *m.shape[2:]), lab, idx, flips


def _write_rows(out, k, plan, rows, skipped):
    c, h = 2 * plan["latent_channels"], plan["latent_size"]
    if rows:
        m, lab, idx, flips = (np.concatenate(parts) for parts in zip(*rows))
    else:  # every image of the shard was skipped: an empty shard still marks it done
        m, lab, idx, flips = np.zeros((0, c, h, h), plan["moments_dtype"]), [], [], []
    write_shard(out, k, plan, m, lab, idx, flips, skipped)


def _progress(total, show):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="encode (rank 0)", disable=not show, file=sys.stderr,
                smoothing=0.05, dynamic_ncols=True)
