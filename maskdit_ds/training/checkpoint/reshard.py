"""Resume on a different number of ranks: a ZeRO tag saved on N ranks -> a DeepSpeed universal checkpoint plus
M per-rank training states, in <tag>/universal/ (removed together with the tag when it is pruned).

ZeRO-2 partitions the fp32 masters and Adam moments by world size, so a plain load refuses another world size.
DeepSpeed's ds_to_universal rewrites them per parameter; an engine created with
{"checkpoint": {"load_universal": true}} re-partitions them for any world size.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

from ... import dist, io
from ...errors import ReshardError
from . import tags

UNIVERSAL = "universal"  # subfolder of a tag; the DeepSpeed tag to load is f"{tag}/universal"


def saved_world_size(tag_dir: Path) -> int:
    manifest = json.loads((Path(tag_dir) / tags.MANIFEST).read_text())
    if "world_size" not in manifest:
        raise ReshardError(f"{tag_dir}/{tags.MANIFEST} does not record the world size it was saved with")
    return int(manifest["world_size"])


def reshard_rank_states(old: list[dict], world_size: int) -> list[dict]:
    """N per-rank training states -> M, keeping the samples consumed in the current epoch.

    Rank r of N at data position p has consumed indices perm[r::N][:p]; together perm[:sum p]. On M ranks at
    position q = sum(p) // M the consumed prefix is perm[:M q], so fewer than M samples are seen twice this epoch.
    step, stage and images_seen are global and copied; rank r takes the RNG state of old rank r % N.
    """
    if world_size < 1:
        raise ReshardError(f"new world size must be positive, got {world_size}")
    trains = {json.dumps(s["train"], sort_keys=True) for s in old}
    if len(trains) != 1:
        raise ReshardError(f"ranks disagree on the training state: {sorted(trains)}")
    epochs = {int(s["data"]["epoch"]) for s in old}
    if len(epochs) != 1:
        raise ReshardError(f"ranks are in different data epochs {sorted(epochs)}; cannot merge their positions")
    epoch = epochs.pop()
    total = sum(int(s["data"]["position"]) for s in old)
    position = total // world_size
    info = {"from_world": len(old), "to_world": world_size, "samples_consumed": total,
            "samples_repeated": total - position * world_size}
    return [{"train": dict(old[0]["train"]), "data": {"epoch": epoch, "position": position},
             "rng": copy.deepcopy(old[r % len(old)]["rng"]), "reshard": info} for r in range(world_size)]


def to_universal(tag_dir: Path, out: Path, workers: int = 1, timeout: float | None = None) -> None:
    """DeepSpeed's ds_to_universal (run as a subprocess, through engine.py's safe entry), into a temp folder
    renamed into place. --inject_missing_state: our engine does not record universal_checkpoint_info."""
    home = str(Path(__file__).resolve().parents[3])  # the folder holding this maskdit_ds, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [home, os.environ.get("PYTHONPATH")]))}
    with io.atomic_path(out) as tmp:
        args = ["--input_folder", str(tag_dir), "--output_folder", str(tmp), "--inject_missing_state",
                "--num_extract_workers", str(workers), "--num_merge_workers", str(workers)]
        # DeepSpeed's converter, its torch.loads forced to weights_only (engine.safe_loads): no code from the tag
        # runs
        cmd = [sys.executable, "-c", "import sys; from maskdit_ds.training.engine import "
               "universal_conversion_main; universal_conversion_main(sys.argv[1:])", *args]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              env=env)
        (tmp.parent / "latest_universal").unlink(missing_ok=True)  # written by the tool; we load by explicit tag
        if proc.returncode != 0:
            raise ReshardError(f"ds_to_universal failed on {tag_dir} (exit {proc.returncode}):\n"
                               f"{proc.stdout[-3000:]}")


def reshard(tag_dir: Path, world_size: int, workers: int = 1) -> Path:
    """<tag>/universal/: the universal checkpoint (made once per tag) + train_state_rankNNN.pt for M ranks +
    complete.json (world_size M, source_world_size N). Returns that folder."""
    tag_dir = Path(tag_dir)
    problem = tags.check_tag(tag_dir)
    if problem:
        raise ReshardError(f"{tag_dir} is not a complete checkpoint: {problem}")
    old_world = saved_world_size(tag_dir)
    old = [tags.load_rank_state(tag_dir, r) for r in range(old_world)]
    new = reshard_rank_states(old, world_size)
    out = tag_dir / UNIVERSAL
    if not (out / "zero").is_dir() or not (out / "mp_rank_00_model_states.pt").is_file():
        to_universal(tag_dir, out, workers)
    (out / tags.MANIFEST).unlink(missing_ok=True)  # incomplete until the new states are written
    for stale in out.glob("train_state_rank*.pt"):
        stale.unlink()
    for rank, state in enumerate(new):
        tags.save_rank_state(out, rank, state)
    # Sizes only: resume_source checks this folder with check_tag(out), which reads no hashes, and hashing a
    # universal checkpoint (GBs) would only delay the resume.
    tags.write_manifest(out, {"step": new[0]["train"]["step"], "world_size": world_size,
                              "source_world_size": old_world}, hashes=False)
    info = new[0]["reshard"]
    dist.say(f"[reshard] {tag_dir} ({old_world} ranks) -> {out} for {world_size} ranks: step "
             f"{new[0]['train']['step']}, {info['samples_consumed']} samples consumed this epoch, new per-rank "
             f"position {new[0]['data']['position']} ({info['samples_repeated']} samples will be seen again)")
    return out


def resume_source(tag_dir: Path, world_size: int) -> tuple[Path, str, bool]:
    """Collective. Where a run of `world_size` ranks resumes tag_dir from: (folder with the per-rank
    train_state files, DeepSpeed tag relative to the checkpoint dir, whether to load it as universal).
    Saved with the same world size: the tag itself. Otherwise rank 0 reshards (once) while the others wait."""
    tag_dir = Path(tag_dir)
    if saved_world_size(tag_dir) == world_size:
        return tag_dir, tag_dir.name, False
    out = tag_dir / UNIVERSAL
    if dist.is_main():
        ready = tags.check_tag(out) is None and saved_world_size(out) == world_size
        if not ready:
            reshard(tag_dir, world_size)
    dist.long_barrier()  # resharding an XL/2 checkpoint can outlast the training group's timeout
    return out, f"{tag_dir.name}/{UNIVERSAL}", True
