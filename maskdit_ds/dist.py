"""Rank, world size, device and every collective: the one place that talks to torch.distributed.

Safe without a process group (a world of one). Tensors handed to a collective are moved to the process group's
device first: NCCL refuses CPU tensors ("No backend type associated with device type cpu"), gloo takes CPU ones.
Long waits (rank 0 resharding a checkpoint, a rank finishing its last chunk of samples) use a side gloo group
with a timeout sized for them, so the training group keeps its short one.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys

import torch
import torch.distributed as tdist

LONG_WAIT = datetime.timedelta(hours=float(os.environ.get("MASKDIT_LONG_WAIT_H", 6)))
_long_group = None
_releases: list = []  # see on_close()


# ---------------------------------------------------------------- who am I


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


def initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if initialized() else int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def world_size() -> int:
    if initialized():
        return tdist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def is_main() -> bool:
    return rank() == 0


def say(text: str) -> None:
    """The one way the package speaks while it works: on rank 0, one line "[topic] message" (or "warning: ...")
    on stdout, written above the progress bar when one is showing (tqdm.write), never through it. Results a
    command prints (a report, a dry run) and the refusal line (errors.py) are not messages."""
    if is_main():
        from tqdm import tqdm

        tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()


def device() -> torch.device:
    """This rank's device. The local rank is taken modulo the visible GPUs: `srun --gpus-per-task 1` shows each
    task only its own GPU (as cuda:0) while SLURM_LOCALID still counts 0..7; `--gpus-per-node 8` shows all eight."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank() % torch.cuda.device_count())


def set_device() -> torch.device:
    """Bind this process to its GPU (before any collective: NCCL and all_gather_object use the current device)."""
    dev = device()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def init_process_group(always: bool = False) -> torch.device:
    """For programs without DeepSpeed (sampling, evaluation): join the launcher's group, nccl on GPUs, gloo on
    CPUs, when the world has more than one rank (or `always`, e.g. to probe NCCL on one GPU). Returns this rank's
    device."""
    env_from_slurm()
    if always:
        ensure_single_process_env()
    dev = set_device()
    if (always or world_size() > 1) and not initialized():
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda"
                                 else None)
    return dev


def destroy_process_group() -> None:
    global _long_group
    if initialized():
        tdist.destroy_process_group()
    _long_group = None


def on_close(release) -> None:
    """Have close() call `release()` once the groups are destroyed: whoever made the group and keeps references to
    it (engine.py: DeepSpeed's cached groups) lets go of them there."""
    _releases.append(release)


def close() -> None:
    """Leave the process group for good: the one place a command does it (cli.command, however the command ends).

    Nothing of torch.distributed may outlive the command. A DeepSpeed engine and its optimizer hold each other
    through hooks, so reference counting never frees them, and DeepSpeed caches a clone of the world group in a
    module global; either kept a gloo group and its threads alive into the interpreter's teardown (seconds long,
    in no fixed order), where a rank that had saved could abort ('terminate called without an active exception',
    signal 6, so the launcher exited 250 instead of 75). So the cycles are collected first, then every group is
    destroyed and the references their makers keep are released: the last one gone joins gloo's threads."""
    import gc

    gc.collect()
    destroy_process_group()
    while _releases:
        _releases.pop()()


# ---------------------------------------------------------------- collectives


def comm_device() -> torch.device:
    """Where the default group wants its tensors: the GPU for nccl, the CPU for gloo."""
    return device() if initialized() and tdist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if initialized():
        tdist.barrier()


def long_barrier() -> None:
    """A barrier that waits up to LONG_WAIT (default 6 h, MASKDIT_LONG_WAIT_H) on a side gloo group, for waits
    that outlast the training group's timeout: rank 0 resharding a checkpoint, ranks finishing uneven work."""
    global _long_group
    if not initialized():
        return
    if _long_group is None:
        _long_group = tdist.new_group(backend="gloo", timeout=LONG_WAIT)
    tdist.barrier(group=_long_group)


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce over ranks; returns a new tensor on the input's device (the input is not modified)."""
    if not initialized():
        return tensor.clone()
    t = tensor.to(comm_device(), copy=True)
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM if op == "sum" else tdist.ReduceOp.MAX)
    return t.to(tensor.device)


class Pending:
    """An all-reduce in flight; `result()` waits for it (its value one step later costs no stall)."""

    def __init__(self, tensor: torch.Tensor, work=None):
        self.tensor, self.work = tensor, work

    def result(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.tensor


def all_reduce_async(tensor: torch.Tensor) -> Pending:
    """Start a sum over ranks without waiting for it."""
    if not initialized():
        return Pending(tensor.clone())
    t = tensor.to(comm_device(), copy=True)
    return Pending(t, tdist.all_reduce(t, op=tdist.ReduceOp.SUM, async_op=True))


def all_gather_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's equally sized 1-D `tensor`, concatenated in rank order: (world * n,) on the input's device."""
    if not initialized():
        return tensor.clone()
    t = tensor.to(comm_device())
    parts = [torch.empty_like(t) for _ in range(tdist.get_world_size())]
    tdist.all_gather(parts, t)
    return torch.cat(parts).to(tensor.device)


def any_rank(flag: bool) -> bool:
    """True on every rank if any rank passed True (e.g. one rank got the preemption signal)."""
    return bool(all_reduce(torch.tensor([1.0 if flag else 0.0]), op="max").item() > 0)


def all_gather_objects(obj) -> list:
    """Every rank's picklable `obj`, on every rank. Small things only (flags, paths, error messages)."""
    if not initialized():
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj):
    """Rank 0's `obj` on every rank."""
    return all_gather_objects(obj if is_main() else None)[0]


def gather_to_main(obj) -> list | None:
    """Every rank's `obj` on rank 0 only (None elsewhere): for results too large to copy to every rank."""
    if not initialized():
        return [obj]
    out = [None] * tdist.get_world_size() if is_main() else None
    tdist.gather_object(obj, out, dst=0)
    return out
