"""A training process's life: stop requests (signals, a vanished launcher) and the run-directory lock.

Stopping: SIGUSR1 (SLURM --signal), SIGTERM and SIGINT ask every rank to finish the step in flight, save and exit 75.
`kill <pid of deepspeed>` ends only DeepSpeed's runner; its `deepspeed.launcher.launch` child and the ranks would
train on as orphans. So each rank watches the launcher processes above it and treats their exit like a signal.

Locking: rank 0 holds <run_dir>/run.lock (host, pid, SLURM job, heartbeat) while a run trains, so a second launch
into the same directory is refused instead of interleaving two trainings' checkpoints.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import psutil

from .. import dist
from ..errors import EXIT_PREEMPTED, RunDirBusy
from ..io import atomic_write_text
LAUNCHERS = ("deepspeed.launcher.launch", "deepspeed.launcher.runner", "bin/deepspeed", "torch.distributed.run",
             "torchrun", "torch.distributed.launch")
ORPHAN_GRACE_S = float(os.environ.get("MASKDIT_ORPHAN_GRACE_S", 600))  # then exit even without a step boundary
LOCK_FILE = "run.lock"
LOCK_STALE_S = 600.0  # a heartbeat older than this is a dead run's (the holder refreshes every HEARTBEAT_S)
HEARTBEAT_S = 60.0


def _identity(proc: psutil.Process) -> tuple[int, float, str]:
    return proc.pid, proc.create_time(), " ".join(proc.cmdline())


def launcher_processes() -> list[tuple[int, float, str]]:
    """The launcher processes above this rank (pid, start time, command): deepspeed's launch.py and its runner,
    or torchrun. Empty for a plain `python -m maskdit_ds` or an srun task, whose parents we must not watch
    (a shell may legitimately exit under nohup; slurmstepd is SLURM's business)."""
    watched, proc = [], psutil.Process().parent()
    while proc is not None and proc.pid > 1:
        try:
            pid, started, cmd = _identity(proc)
        except psutil.Error:
            break
        if not any(name in cmd for name in LAUNCHERS):
            break
        watched.append((pid, started, cmd))
        proc = proc.parent()
    return watched


def _alive(pid: int, started: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class StopRequest:
    """Set by a signal or by the launcher's exit; the training loop polls `requested` at step boundaries.

    A second SIGINT (Ctrl-C twice) aborts at once. If no step boundary comes within ORPHAN_GRACE_S after the
    launcher vanished (a rank stuck in a collective whose peer died), the process exits with code 1.
    """

    def __init__(self, watch_launcher: bool = True, poll_s: float = 1.0):
        self.requested, self.reason = False, ""
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self._stop = threading.Event()
        self.watched = launcher_processes() if watch_launcher else []
        self._watcher = threading.Thread(target=self._watch, args=(poll_s,), name="launcher-watch", daemon=True)
        if self.watched:
            self._watcher.start()

    def request(self, reason: str) -> None:
        if not self.requested:
            self.requested, self.reason = True, reason
            dist.say(f"[stop] {reason}: saving at the next step boundary, then exiting {EXIT_PREEMPTED}")

    def _on_signal(self, signum, frame):
        if signum == signal.SIGINT and self.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.request(f"received {signal.Signals(signum).name}")

    def _watch(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            gone = [(pid, cmd) for pid, started, cmd in self.watched if not _alive(pid, started)]
            if gone:
                self.request(f"the launcher (pid {gone[0][0]}: {gone[0][1][:80]}) exited")
                if not self._stop.wait(ORPHAN_GRACE_S):
                    dist.say(f"[stop] no step boundary within {ORPHAN_GRACE_S:.0f} s of the launcher's exit: "
                             "exiting without a final save")
                    os._exit(1)
                return

    def close(self) -> None:
        """Saved (or finished, or failed); only the exit is left. The launcher watch ends (joined, so that no thread
        of ours outlives the run), and the stop signals are ignored from here: `srun --kill-on-bad-exit` and
        DeepSpeed's launcher SIGTERM the other ranks as soon as the first one exits 75, and Python's shutdown
        restores the default (fatal) handlers, so a rank still shutting down would end 143."""
        self._stop.set()
        if self._watcher.is_alive():
            self._watcher.join()
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)


# ---------------------------------------------------------------- the run-directory lock


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "heartbeat": time.time()}


def stale_reason(lock: dict, now: float | None = None) -> str | None:
    """Why a lock left by another process no longer holds (None: its holder may be alive)."""
    now = time.time() if now is None else now
    if lock.get("slurm_job") and lock.get("slurm_job") == os.environ.get("SLURM_JOB_ID"):
        return f"it belongs to an earlier attempt of this SLURM job {lock['slurm_job']} (requeued)"
    if lock.get("host") == socket.gethostname() and not _alive(int(lock.get("pid", -1)), lock.get("started", -1)):
        return f"process {lock.get('pid')} on this host is gone"
    age = now - float(lock.get("heartbeat", 0))
    if age > LOCK_STALE_S:
        return f"its heartbeat is {age / 60:.0f} min old"
    return None


class RunLock:
    """<run_dir>/run.lock, created exclusively; a stale lock (dead holder) is taken over with a message."""

    def __init__(self, run_dir: Path):
        self.path, self.held = Path(run_dir) / LOCK_FILE, False
        self._stop = threading.Event()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # create; or take over a stale lock and create again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_holder(), f)
            self.held = True
            self._beat = threading.Thread(target=self._heartbeat, name="run-lock", daemon=True)
            self._beat.start()
            return
        raise RunDirBusy(f"could not create {self.path}: another launch is taking it at the same moment")

    def _clear_stale(self) -> None:
        try:
            lock = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except ValueError:  # torn by a crash mid-write: its file time stands in for the heartbeat
            lock = {"heartbeat": self.path.stat().st_mtime}
        reason = stale_reason(lock)
        if reason is None:
            age = time.time() - float(lock.get("heartbeat", self.path.stat().st_mtime))
            raise RunDirBusy(
                f"{self.path.parent} is in use by pid {lock.get('pid', '?')} on host {lock.get('host', '?')}"
                + (f" (SLURM job {lock['slurm_job']})" if lock.get("slurm_job") else "")
                + f", alive {age:.0f} s ago; stop that run first or choose another run.name "
                f"(if that process is really gone, delete {self.path})")
        dist.say(f"[lock] taking over {self.path}: {reason}")
        self.path.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            atomic_write_text(self.path, json.dumps(_holder()))

    def release(self) -> None:
        self._stop.set()
        if getattr(self, "_beat", None) is not None:
            self._beat.join()
            self._beat = None
        if self.held:
            try:
                if json.loads(self.path.read_text()).get("pid") == os.getpid():
                    self.path.unlink()
            except (OSError, ValueError):
                pass
            self.held = False
