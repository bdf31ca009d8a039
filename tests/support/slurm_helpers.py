"""A throwaway one-node SLURM cluster on localhost (munged, slurmctld, slurmd; state in a temp dir) for the template tests."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from maskdit_ds.dist import free_port

# Only needed for the cluster; NodeName is "localhost" so that it does not depend on this machine's hostname.
SLURM_CONF = """\
ClusterName=maskdit-test
SlurmctldHost=localhost({ctld_addr})
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=5
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/spool/%n
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd-%n.pid
SlurmctldLogFile={state}/log/slurmctld.log
SlurmdLogFile={state}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=30
MinJobAge=600
SchedulerParameters=sched_interval=2
{node_lines}
PartitionName=debug Nodes={node_names} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmUnavailable(RuntimeError):
    """SLURM could not be installed or started here; the tests skip with this message."""


def _run(cmd, timeout=60, env=None, check=True, cwd=None) -> subprocess.CompletedProcess:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SlurmUnavailable(f"{' '.join(map(str, cmd))}: {err}") from err
    if check and out.returncode != 0:
        raise SlurmUnavailable(f"{' '.join(map(str, cmd))} exited {out.returncode}: {out.stderr.strip()[-800:]}")
    return out


def ensure_installed() -> None:
    """apt-get install slurm-wlm and munge when a binary is missing (CI runs as root on Debian/Ubuntu)."""
    needed = ("sbatch", "slurmctld", "slurmd", "munged", "scontrol")
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in needed):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurm-wlm/munge are not installed and installing them needs root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm/munge are not installed and there is no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-q"], timeout=300, env=env)
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"], timeout=600, env=env)


def node_hardware() -> str:
    """The NodeName line's hardware fields as slurmd itself detects them (CPUs, sockets, cores, memory)."""
    out = _run([_sbin("slurmd"), "-C"], timeout=30).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0]))
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    missing = [k for k in keys if k not in fields]
    if missing:
        raise SlurmUnavailable(f"slurmd -C printed no {missing}: {out.strip()}")
    return " ".join(f"{k}={fields[k]}" for k in keys)


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _wait(predicate, timeout: float, what: str, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise SlurmUnavailable(f"timed out after {timeout:.0f} s waiting for {what}")


def _pid_from(path: Path):
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) still answers kill(0).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return False


class LocalCluster:
    """munged + slurmctld + one slurmd per node; everything (sockets, state, logs) under `root`.

    One node called localhost by default. Given `hosts` (multinode.Hosts, network namespaces joined by a bridge):
    one node per host, named after it, its slurmd started inside the host's namespace under its host name, and
    slurmctld listening on the bridge. Clients (sbatch, squeue, scontrol, scancel) must run with `env` (it sets
    SLURM_CONF).
    """

    def __init__(self, root: Path, hosts=None):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.hosts = hosts
        self.nodes = [h.name for h in hosts] if hosts else ["localhost"]
        self.pids: dict[str, int] = {}  # daemon name -> pid, only the ones this object started
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    @property
    def daemons(self) -> list[str]:
        """Names of the daemons, in start order (log_tail and stop take these)."""
        return ["munged", "slurmctld", *(f"slurmd-{n}" for n in self.nodes)]

    # ------------------------------------------------------------ start
    def start(self) -> "LocalCluster":
        for sub in ("ctld", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        hw = node_hardware()
        addrs = [h.ip for h in self.hosts] if self.hosts else ["127.0.0.1"]
        self.conf.write_text(SLURM_CONF.format(
            ctld_port=free_port(), slurmd_port=free_port(), munge_socket=self.munge_dir / "munge.socket",
            state=self.root, ctld_addr=self.hosts.gateway if self.hosts else "127.0.0.1",
            node_lines="\n".join(f"NodeName={n} NodeAddr={a} {hw} State=UNKNOWN" for n, a in zip(self.nodes, addrs)),
            node_names=",".join(self.nodes)))
        self._daemon("slurmctld", [_sbin("slurmctld"), "-f", str(self.conf)], self.root / "slurmctld.pid")
        for i, node in enumerate(self.nodes):
            (self.root / "spool" / node).mkdir(exist_ok=True)
            cmd = [_sbin("slurmd"), "-f", str(self.conf), "-N", node]
            if self.hosts:
                cmd = self.hosts.command(self.hosts[i], cmd)
            self._daemon(f"slurmd-{node}", cmd, self.root / f"slurmd-{node}.pid")
        _wait(self._nodes_idle, 60, "every node to become idle (sinfo)")
        return self

    def _start_munge(self) -> None:
        """Our own munged on our own socket, so that a munged started by someone else is never touched."""
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            _run([_sbin("mungekey"), "--create"], timeout=30)
            shutil.chown(key, "munge", "munge")  # munged runs as the munge user and must read its key
        self.munge_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.munge_dir, "munge", "munge")
        self.munge_dir.chmod(0o755)
        # munged refuses to run as root without --force; run it as the package's munge user, as the service does.
        cmd = ["runuser", "-u", "munge", "--", _sbin("munged"), f"--socket={self.munge_dir / 'munge.socket'}",
               f"--pid-file={self.munge_dir / 'munged.pid'}", f"--log-file={self.munge_dir / 'munged.log'}",
               f"--seed-file={self.munge_dir / 'munged.seed'}"]
        self._daemon("munged", cmd, self.munge_dir / "munged.pid")

    def _daemon(self, name: str, cmd: list, pid_file: Path) -> None:
        """Start a self-daemonizing program and record the pid it writes (the one we will stop later)."""
        out = _run(cmd, timeout=60, check=False)
        pid = _wait(lambda: _pid_from(pid_file) if pid_file.exists() else None, 20, f"{name} to write {pid_file}")
        self.pids[name] = pid
        if out.returncode != 0 or not _alive(pid):
            raise SlurmUnavailable(f"{name} did not start (exit {out.returncode}): {out.stderr.strip()[-500:]}\n"
                                   f"{self.log_tail(name)}")

    def _nodes_idle(self) -> bool:
        out = _run(["sinfo", "-h", "-N", "-o", "%T"], timeout=20, env=self.env, check=False)
        return out.returncode == 0 and out.stdout.split() == ["idle"] * len(self.nodes)

    # ------------------------------------------------------------ jobs
    def sbatch(self, args: list, env: dict, cwd=None) -> int:
        """Submit from `cwd` (the job's SLURM_SUBMIT_DIR); returns the job id."""
        out = _run(["sbatch", "--parsable", *args], timeout=30, env={**env, "SLURM_CONF": str(self.conf)}, cwd=cwd)
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...); {} once SLURM has forgotten it."""
        out = _run(["scontrol", "show", "job", "-o", str(job_id)], timeout=20, env=self.env, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout)) if out.returncode == 0 else {}

    def scancel(self, *args) -> None:
        _run(["scancel", *map(str, args)], timeout=20, env=self.env)

    def log_tail(self, name: str, chars: int = 1500) -> str:
        path = self.munge_dir / "munged.log" if name == "munged" else self.root / "log" / f"{name}.log"
        try:
            return f"--- {path} ---\n" + path.read_text(errors="replace")[-chars:]
        except OSError:
            return f"--- {path}: not written ---"

    # ------------------------------------------------------------ stop
    def stop(self) -> None:
        """Cancel what is still queued, then stop the daemons we started (newest first) by their pids."""
        if "slurmctld" in self.pids:
            _run(["scancel", "--full", "--partition=debug"], timeout=20, env=self.env, check=False)
            try:
                _wait(lambda: not _run(["squeue", "-h"], timeout=20, env=self.env, check=False).stdout.strip(),
                      40, "jobs to end")
            except SlurmUnavailable:
                pass
        for name in reversed(self.daemons):
            pid = self.pids.pop(name, None)
            if pid is None or not _alive(pid):
                continue
            os.kill(pid, signal.SIGTERM)
            try:
                _wait(lambda: not _alive(pid), 20, f"{name} ({pid}) to exit", interval=0.1)
            except SlurmUnavailable:
                os.kill(pid, signal.SIGKILL)


def start_cluster(hosts=None):
    """(cluster, None) when up; (None, reason) when SLURM cannot be installed or started here. `hosts`: one node
    per host of a multinode.Hosts (already up), else one node called localhost."""
    root = Path(tempfile.mkdtemp(prefix="maskdit_slurm_"))
    root.chmod(0o755)  # the munge user must reach its socket directory
    cluster = LocalCluster(root, hosts)
    try:
        if os.geteuid() != 0:
            raise SlurmUnavailable("running slurmctld/slurmd as SlurmUser=root needs root (CI runs as root)")
        ensure_installed()
        return cluster.start(), None
    except SlurmUnavailable as err:
        logs = "\n".join(cluster.log_tail(n) for n in cluster.daemons)
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
        return None, f"{err}\n{logs}"


# ---------------------------------------------------------------- jobs of the tests

ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def job_env(out_dir: Path, run_name: str) -> dict:
    """The submit environment (sbatch copies it into the job and into a requeued job): the template's knobs."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in drop}
    venv = sys.prefix if sys.prefix != sys.base_prefix else ""  # its bin/ first on PATH: DeepSpeed's JIT ninja
    env.update(CONFIG="digits", OUT_DIR=str(out_dir), RUN_NAME=run_name, VENV=venv, PYTHON=sys.executable,
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def job_log(logs: Path, job: int) -> str:
    files = sorted(logs.glob(f"*-{job}.out"))
    return files[0].read_text(errors="replace") if files else f"(no log for job {job} in {logs})"


def wait_until_ended(cluster, job: int, logs: Path, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = cluster.job(job)
        if info.get("JobState") in ENDED:
            return info
        time.sleep(1)
    cluster.scancel(job)
    pytest.fail(f"job {job} did not end in {timeout:.0f} s: {cluster.job(job)}\n{job_log(logs, job)[-4000:]}")


def stats_steps(run_dir: Path) -> list[int]:
    path = run_dir / "stats.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


@contextlib.contextmanager
def running_cluster(hosts=None):
    """A started cluster (start_cluster) for a fixture to yield, stopped and removed afterwards; the test skips, with
    the reason, where SLURM cannot run."""
    cluster, reason = start_cluster(hosts)
    if cluster is None:
        print(f"\n[slurm] skipped: SLURM could not be started: {reason}", file=sys.stderr, flush=True)
        pytest.skip(f"SLURM could not be started: {reason}")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
