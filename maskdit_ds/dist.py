"""Rank, world size and rank-0 printing; safe without a process group. Maps SLURM's variables for srun launches."""
from __future__ import annotations

import os
import subprocess

import torch
import torch.distributed as tdist


def env_from_slurm() -> None:
    """Under `srun python -m maskdit_ds ...` each task gets SLURM_PROCID etc.; torch/DeepSpeed read RANK etc."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
        first = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True).stdout.split()
        os.environ["MASTER_ADDR"] = first[0] if first else "127.0.0.1"
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 10000))


def ensure_single_process_env() -> None:
    """`python -m maskdit_ds train` without a launcher: a world of one (DeepSpeed would otherwise try MPI)."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def free_port() -> int:
    """A TCP port that is free on this host now (for a rendezvous; one per launch)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank() -> int:
    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def device() -> torch.device:
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if any rank passed True (e.g. one rank got the preemption signal)."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device() if tdist.get_backend() == "nccl" else "cpu")
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_gather_objects(obj) -> list:
    if not (tdist.is_available() and tdist.is_initialized()):
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out
