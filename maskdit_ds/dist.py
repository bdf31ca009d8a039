"""Rank, world size, device and every collective: the one place that talks to torch.distributed.

Safe without a process group (a world of one). Tensors handed to a collective are moved to the process group's
device first: NCCL refuses CPU tensors ("No backend type associated with device type cpu"), gloo takes CPU ones.
Long waits (rank 0 resharding a checkpoint, a rank finishing its last chunk of samples) use a side gloo group
with a timeout sized for them, so the training group keeps its short one.
"""
from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
import threading
import time

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

    stop_watching(join=True)
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


def data_parallel(net: torch.nn.Module) -> torch.nn.Module:
    """torch's DistributedDataParallel over the world (the plain-PyTorch loop's gradient all-reduce: the bench's
    baseline at more than one rank); the network itself on one rank. find_unused_parameters: which parameters a
    step uses depends on its mask (the mask token only when tokens are dropped)."""
    if world_size() <= 1:
        return net
    from torch.nn.parallel import DistributedDataParallel

    dev = device()
    return DistributedDataParallel(net, device_ids=[dev] if dev.type == "cuda" else None,
                                   find_unused_parameters=True)


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


# ---------------------------------------------------------------- many hosts: joining, lost ranks
#
# A rank whose peer died learns it from a failed collective at once (its sockets close). A peer whose host dropped
# off the network is not always noticed: gloo's timeout covers waits for data, but a send into a dead link can
# block for good. So every rank runs a watchdog thread: it adds 1 to its own counter in the rendezvous store (in
# rank 0's process, MASTER_ADDR:MASTER_PORT) every HEARTBEAT_S and reads everyone's; a counter that stands still
# for the group's timeout, or a store that cannot be reached for that long, ends this rank with a line naming
# the lost ranks and hosts (exit code 5), wherever its main thread is stuck.

HEARTBEAT_S = 1.0
ALIVE_KEY = "maskdit/alive/{}"
_hosts: list[str] = []  # the host name of each rank, gathered once the group is up
_watchdog = None


def host() -> str:
    return socket.gethostname()


def rendezvous() -> str:
    return f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"


class joining:
    """Around the backend's process-group start: a rendezvous that fails or times out (master missing or
    unreachable, wrong MASTER_PORT, a host that never starts) becomes one PeerLost line saying which."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None or not isinstance(err, tdist.DistError):
            return False
        from .errors import PeerLost

        me, world, cause = rank(), world_size(), str(err).strip().splitlines()[0]
        within = f"within {self.timeout_s:g} s (dist.timeout_s)"
        if "EADDRINUSE" in cause or "address already in use" in cause:
            what = f"MASTER_PORT {os.environ.get('MASTER_PORT')} is already in use on this host: choose another one"
        elif me == 0:
            what = (f"not all {world} ranks joined {within} at {rendezvous()}: a host was never started, or its "
                    "ranks use another MASTER_ADDR/MASTER_PORT")
        else:
            what = (f"could not join rank 0's rendezvous at {rendezvous()} {within}: the master is not running, "
                    "cannot be reached from this host, or listens on another MASTER_PORT")
        raise PeerLost(f"rank {me} of {world} on {host()}: {what} ({cause})") from None


def watch_peers(timeout_s: float) -> None:
    """Collective, once the group is up: learn every rank's host and start this rank's watchdog."""
    global _hosts, _watchdog
    if not initialized() or world_size() == 1 or not {"MASTER_ADDR", "MASTER_PORT"} <= set(os.environ):
        return  # no store to beat into (a group made from a file or a custom init_method)
    _hosts = all_gather_objects(host())
    _watchdog = Watchdog(timeout_s)


def stop_watching(join: bool = False) -> None:
    """Training is over on this rank: peers that end before it are no longer a failure. join: also wait for the
    watchdog's threads and let go of its store client (close(): nothing may outlive the command)."""
    global _watchdog
    if _watchdog is None:
        return
    _watchdog.stop.set()
    if join:
        for thread in _watchdog.threads:
            thread.join(timeout=2 * HEARTBEAT_S + _watchdog.timeout_s)  # a store call blocks at most timeout_s
        _watchdog = None


def _store(timeout_s: float):
    """A client of the rendezvous store (the group's own store object is private to torch)."""
    return tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


class Watchdog:
    """This rank's heartbeat, and the check on everyone else's (see above). Two threads: one talks to the store
    (a call into a dead link may block for good), the other judges what it last heard, and never blocks."""

    def __init__(self, timeout_s: float):
        self.timeout_s, self.stop = timeout_s, threading.Event()
        self.store = _store(timeout_s=min(timeout_s, 30))
        self.keys = [ALIVE_KEY.format(r) for r in range(len(_hosts))]
        now = time.monotonic()
        self.counts, self.changed, self.store_ok = [None] * len(self.keys), [now] * len(self.keys), now
        self.threads = [threading.Thread(target=self.beat, name="maskdit-heartbeat", daemon=True),
                        threading.Thread(target=self.check, name="maskdit-watchdog", daemon=True)]
        for thread in self.threads:
            thread.start()

    def beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                self.store.add(self.keys[rank()], 1)
                counts = [int(v) for v in self.store.multi_get(self.keys)]
            except Exception:  # unreachable or gone: judged by check() from how long it has been
                continue
            now = time.monotonic()
            for r, count in enumerate(counts):
                if count != self.counts[r]:
                    self.counts[r], self.changed[r] = count, now
            self.store_ok = now

    def check(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            now = time.monotonic()
            if now - self.store_ok > self.timeout_s:
                self.fail(store_unreachable(f"no answer for {now - self.store_ok:.0f} s, dist.timeout_s "
                                            f"{self.timeout_s:g}"))
            lost = [r for r in range(len(self.keys)) if now - self.changed[r] > self.timeout_s and r != rank()]
            if lost:
                self.fail(lost_message(lost, f"no heartbeat for {self.timeout_s:g} s (dist.timeout_s)"))

    def fail(self, message: str) -> None:
        """Exit from this thread: the main thread may be blocked in a collective that never returns."""
        if self.stop.is_set():
            return
        from .errors import EXIT_PEER_LOST

        print(f"\ndistributed error: {message}", file=sys.stderr, flush=True)  # after a progress bar
        os._exit(EXIT_PEER_LOST)


def lost_message(lost: list[int], evidence: str, cause: str = "") -> str:
    by_host: dict[str, list[int]] = {}
    for r in lost:
        by_host.setdefault(_hosts[r], []).append(r)
    names = "; ".join(f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} on {h}"
                      for h, rs in by_host.items())
    return (f"rank {rank()} on {host()}: lost {names} ({evidence}: the process died, the host went down or its "
            f"network is cut); this rank stops too" + (f" ({cause})" if cause else ""))


def store_unreachable(evidence: str, cause: str = "") -> str:
    return (f"rank {rank()} on {host()}: rank 0's store at {rendezvous()} (host {_hosts[0]}) cannot be reached "
            f"({evidence}): {_hosts[0]} is down or this host lost its network" + (f" ({cause})" if cause else ""))


def lost_ranks(wait_s: float = 3 * HEARTBEAT_S) -> list[int] | None:
    """The ranks whose heartbeat stood still for wait_s; None when the store cannot be reached."""
    try:
        store = _store(timeout_s=5)
        keys = [ALIVE_KEY.format(r) for r in range(len(_hosts))]
        before = store.multi_get(keys)
        time.sleep(wait_s)
        after = store.multi_get(keys)
    except Exception:
        return None
    return [r for r, (a, b) in enumerate(zip(before, after)) if a == b and r != rank()]


def is_comm_failure(err: BaseException) -> bool:
    """A collective that failed because a peer vanished (gloo raises plain RuntimeErrors, NCCL DistErrors)."""
    text = str(err)
    return isinstance(err, tdist.DistError) or (
        type(err) is RuntimeError and any(s in text for s in ("gloo", "Connection closed by peer", "Timed out",
                                                              "Connection reset", "NCCL")))


class naming_lost_peers:
    """Around training: a collective that failed because ranks are gone becomes one PeerLost line naming the
    lost ranks and their hosts (at once, where the watchdog would wait for the timeout). Any other error passes
    through unchanged. Leaving it, however, ends the watch."""

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None or not _hosts or not is_comm_failure(err):
            stop_watching()
            return False
        from .errors import PeerLost

        lost = lost_ranks()
        stop_watching()
        cause = str(err).strip().splitlines()[0][:300]
        if lost is None:
            raise PeerLost(store_unreachable("after a collective failed", cause)) from err
        if not lost:
            return False  # every rank is alive: not a lost peer; the original error says what happened
        raise PeerLost(lost_message(lost, f"no heartbeat for {3 * HEARTBEAT_S:g} s after a collective failed",
                                    cause)) from err


# ---------------------------------------------------------------- shared storage


def check_shared_dir(folder) -> None:
    """Collective: every rank must see the directory rank 0 sees (one run directory on shared storage). Rank 0
    writes a fresh random token there; a rank that reads another token, or none, is on another disk."""
    import secrets
    from pathlib import Path

    from .errors import ConfigError

    if not initialized() or world_size() == 1:
        return
    token = None
    if is_main():
        token = secrets.token_hex(16)
        Path(folder).mkdir(parents=True, exist_ok=True)
        from .io import atomic_write_text

        atomic_write_text(Path(folder) / f".shared-{token}", token)  # its own name: two launches never collide
    token = broadcast_from_main(token)
    path = Path(folder) / f".shared-{token}"
    try:
        seen = path.read_text() == token
    except OSError:
        seen = False
    report = all_gather_objects((host(), seen))
    barrier()  # everyone has read it
    if is_main():
        path.unlink(missing_ok=True)
    blind = sorted({h for h, ok in report if not ok})
    if blind:
        ranks = [r for r, (_, ok) in enumerate(report) if not ok]
        many = len(blind) > 1
        raise ConfigError(f"run.out_dir: {Path(folder)} is not shared storage: host{'s' if many else ''} "
                          f"{', '.join(blind)} (rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}) "
                          f"do{'' if many else 'es'} not see the file rank 0 on {report[0][0]} wrote there; every "
                          f"rank must write one run directory, so put run.out_dir on a filesystem all hosts mount")
