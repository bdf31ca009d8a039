"""N hosts on one machine: a Linux network namespace per host, joined by a bridge, for the multi-node tests and
`bash tools/local_cluster.sh up N`.

Host i gets the namespace <prefix>-h<i>, an `eth0` (one end of a veth pair whose other end is on the bridge), the
address <subnet>.(10+i), its own host name (a UTS namespace per command: `hostname` prints it, gloo and SLURM
resolve it) and an /etc/hosts that names every host (/etc/netns/<ns>/hosts bind-mounted over /etc/hosts in a
mount namespace of its own). The filesystem is the machine's: every host sees the same run directory (shared
storage), and a Unix socket such as munged's is reachable from every host. The root namespace has <subnet>.1 on the bridge, which
is where slurmctld listens.

Only addresses of the namespaces made here are used; `down()` removes every namespace, link and hosts file made
here and kills what still runs inside the namespaces.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

NETNS_ETC = Path("/etc/netns")
NETNS_RUN = Path("/run/netns")  # `ip netns add` makes it a mount point the first time


def _mounted(path: Path) -> bool:
    return any(line.split()[4] == str(path) for line in Path("/proc/self/mountinfo").read_text().splitlines())


class NamespacesUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no `ip`); the tests skip with this message."""


def _ip(*args, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise NamespacesUnavailable(f"ip {' '.join(args)} exited {out.returncode}: {out.stderr.strip()}")
    return out


def unavailable_reason() -> str | None:
    """Why N hosts cannot be made on this machine (None: they can). Installs iproute2 when `ip` is missing."""
    if os.geteuid() != 0:
        return "network namespaces (ip netns add) need root; CI runs as root"
    if not shutil.which("ip") and shutil.which("apt-get"):
        try:
            _apt_install("iproute2")
        except NamespacesUnavailable as err:
            return str(err)
    for tool in ("ip", "nsenter", "unshare", "mount", "hostname"):
        if not shutil.which(tool):
            return f"`{tool}` is not installed (iproute2 / util-linux)"
    return None


def free_subnet() -> str:
    """A 10.x.y.0/24 that no interface or route here uses yet, picked at random so that two clusters can coexist."""
    used = _ip("-4", "route", "show").stdout + _ip("-4", "addr", "show").stdout
    for _ in range(200):
        net = f"10.{secrets.randbelow(200) + 50}.{secrets.randbelow(250) + 1}"
        if f"{net}." not in used:
            return net
    raise NamespacesUnavailable("no free 10.x.y.0/24 subnet found")


@dataclass
class Host:
    name: str  # host name (the UTS name, SLURM's NodeName)
    netns: str  # network namespace
    ip: str
    veth: str  # the root-namespace end of its link, on the bridge: `ip link set <veth> down` cuts the host off


@dataclass
class Rank:
    rank: int
    host: Host
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class Hosts:
    """N hosts: `up()` makes them, `run()`/`popen()` run commands on one, `down()` removes everything."""

    def __init__(self, n: int, prefix: str | None = None, subnet: str | None = None):
        self.prefix = prefix or f"md{secrets.token_hex(2)}"  # short: interface names have 15 characters at most
        self.subnet = subnet
        self.bridge = f"{self.prefix}br"
        self.hosts = [Host(f"node{i}", f"{self.prefix}-h{i}", "", f"{self.prefix}v{i}") for i in range(1, n + 1)]
        self.made_run_mount = False  # /run/netns became a mount point because of us: unmount it when last out

    @property
    def gateway(self) -> str:
        """The root namespace's address on the bridge."""
        return f"{self.subnet}.1"

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __len__(self) -> int:
        return len(self.hosts)

    # ------------------------------------------------------------ up / down
    def up(self) -> "Hosts":
        reason = unavailable_reason()
        if reason:
            raise NamespacesUnavailable(reason)
        self.subnet = self.subnet or free_subnet()
        self.made_run_mount = not _mounted(NETNS_RUN)
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, host in enumerate(self.hosts, start=1):
                host.ip = f"{self.subnet}.{10 + i}"
                _ip("netns", "add", host.netns)
                _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
                _ip("link", "set", host.veth, "master", self.bridge, "up")
                _ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
                _ip("-n", host.netns, "link", "set", "eth0", "up")
                _ip("-n", host.netns, "link", "set", "lo", "up")
            self._write_hosts_files()
        except Exception:
            self.down()
            raise
        return self

    def _write_hosts_files(self) -> None:
        lines = ["127.0.0.1 localhost", f"{self.gateway} {self.prefix}-gw"]
        lines += [f"{h.ip} {h.name}" for h in self.hosts]
        for host in self.hosts:
            folder = NETNS_ETC / host.netns
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text("\n".join(lines) + "\n")

    def down(self) -> list[str]:
        """Kill what runs on the hosts, delete namespaces, links, bridge and hosts files. Returns what was left
        (empty when everything is gone)."""
        for host in self.hosts:
            self.kill_all(host, signal.SIGKILL)
        for host in self.hosts:
            _ip("netns", "del", host.netns, check=False)
            _ip("link", "del", host.veth, check=False)  # deleting the namespace frees it, sometimes only later
            shutil.rmtree(NETNS_ETC / host.netns, ignore_errors=True)
        _ip("link", "del", self.bridge, check=False)
        try:
            NETNS_ETC.rmdir()  # only if empty: someone else's namespaces keep theirs
        except OSError:
            pass
        if self.made_run_mount and _mounted(NETNS_RUN) and not any(NETNS_RUN.iterdir()):
            subprocess.run(["umount", str(NETNS_RUN)], capture_output=True, timeout=30)
        deadline = time.monotonic() + 10
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.leftovers()

    def leftovers(self) -> list[str]:
        """Namespaces, links and hosts files of this cluster that still exist."""
        names = set(_ip("netns", "list", check=False).stdout.split())
        links = _ip("-o", "link", "show", check=False).stdout
        left = [f"netns {h.netns}" for h in self.hosts if h.netns in names]
        left += [f"link {n}" for n in [self.bridge, *(h.veth for h in self.hosts)] if f" {n}:" in links
                 or f" {n}@" in links]
        left += [f"file {NETNS_ETC / h.netns}" for h in self.hosts if (NETNS_ETC / h.netns).exists()]
        if self.made_run_mount and _mounted(NETNS_RUN) and not any(NETNS_RUN.iterdir()):
            left.append(f"mount {NETNS_RUN}")
        return left

    # ------------------------------------------------------------ commands on a host
    def command(self, host: Host, cmd: list[str], private_dirs=()) -> list[str]:
        """`cmd` as it runs on `host`: in its network namespace, under its own host name. Each of private_dirs
        gets an empty tmpfs over it that only this command sees: a disk the other hosts do not share."""
        # Not `ip netns exec`: it remounts /sys for the namespace, which hides /sys/fs/cgroup from slurmd.
        hosts_file = NETNS_ETC / host.netns / "hosts"
        mounts = "".join(f"mount -t tmpfs tmpfs {d} && " for d in private_dirs)
        return ["nsenter", f"--net=/run/netns/{host.netns}", "unshare", "--mount", "--uts", "sh", "-c",
                f'mount --bind {hosts_file} /etc/hosts && {mounts}hostname {host.name} && exec "$@"', "sh",
                *map(str, cmd)]

    def run(self, host: Host, cmd: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, cmd), capture_output=True, text=True, timeout=timeout, **kwargs)

    def popen(self, host: Host, cmd: list[str], private_dirs=(), **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(host, cmd, private_dirs), **kwargs)

    def start_ranks(self, per_host: int, argv: list[str], env: dict, logs: Path, master_port: int,
                    on: list[Host] | None = None, private_dirs: dict | None = None) -> list["Rank"]:
        """What a launcher does on every host (or those `on`): per_host ranks on each (global rank = host index x
        per_host + local rank), RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR (the first host)/MASTER_PORT set; each
        rank's output in logs/rank<r>.log. private_dirs: {host name: [dirs]} that host sees on a disk of its
        own."""
        used = on or self.hosts
        world, ranks = per_host * len(used), []
        for h, host in enumerate(used):
            for local in range(per_host):
                r = h * per_host + local
                rank_env = {**env, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
                            "MASTER_ADDR": used[0].name, "MASTER_PORT": str(master_port)}
                log = Path(logs) / f"rank{r}.log"
                with open(log, "w") as out:
                    proc = self.popen(host, argv, (private_dirs or {}).get(host.name, ()), env=rank_env,
                                      stdout=out, stderr=subprocess.STDOUT)
                ranks.append(Rank(r, host, proc, log))
        return ranks

    def pids(self, host: Host) -> list[int]:
        """Every process in the host's network namespace."""
        out = _ip("netns", "pids", host.netns, check=False).stdout.split()
        return [int(p) for p in out if p.isdigit()]

    def kill_all(self, host: Host, sig=signal.SIGKILL) -> list[int]:
        """What a node crash does to its processes: every one in the namespace gets `sig`."""
        killed = []
        for pid in self.pids(host):
            try:
                os.kill(pid, sig)
                killed.append(pid)
            except ProcessLookupError:
                pass
        return killed

    def set_link(self, host: Host, up: bool) -> None:
        """Cable pulled (up=False) or plugged back in: the host's packets stop at the bridge; no RST is sent."""
        _ip("link", "set", host.veth, "up" if up else "down")

    # ------------------------------------------------------------ state file (tools/local_cluster.sh)
    def to_dict(self) -> dict:
        return {"prefix": self.prefix, "subnet": self.subnet, "made_run_mount": self.made_run_mount,
                "hosts": [asdict(h) for h in self.hosts]}

    @classmethod
    def from_dict(cls, d: dict) -> "Hosts":
        hosts = cls(len(d["hosts"]), d["prefix"], d["subnet"])
        hosts.hosts, hosts.made_run_mount = [Host(**h) for h in d["hosts"]], d["made_run_mount"]
        return hosts


# ---------------------------------------------------------------- ssh between the hosts (DeepSpeed's pdsh launcher)


def ensure_ssh_installed() -> None:
    """apt-get install openssh-server and pdsh when missing (CI runs as root on Debian/Ubuntu)."""
    if shutil.which("pdsh") and Path("/usr/sbin/sshd").exists() and shutil.which("ssh-keygen"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise NamespacesUnavailable("openssh-server/pdsh are not installed and cannot be (needs root and apt-get)")
    _apt_install("openssh-server", "openssh-client", "pdsh")


def _apt_install(*packages: str) -> None:
    """As slurm_helpers.ensure_installed does for SLURM: the Debian packages, from a bare CI machine."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        if out.returncode != 0:
            raise NamespacesUnavailable(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr.strip()[-500:]}")


SSHD_CONFIG = """\
Port 22
HostKey {root}/host_key
AuthorizedKeysFile {root}/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
"""


class Sshd:
    """An sshd on every host (port 22 of its namespace) that lets root in with one key generated here; `env`
    makes pdsh's ssh use that key. All files under `root`; `stop()` ends the daemons."""

    def __init__(self, hosts: Hosts, root: Path):
        self.hosts, self.root = hosts, Path(root)
        self.procs: list[subprocess.Popen] = []
        self.made_privsep = False  # /run/sshd (sshd's privilege separation directory) made by us

    @property
    def key(self) -> Path:
        return self.root / "id_ed25519"

    def start(self) -> "Sshd":
        ensure_ssh_installed()
        self.root.mkdir(parents=True, exist_ok=True)
        for name in ("host_key", "id_ed25519"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.root / name)],
                           check=True, capture_output=True, timeout=30)
        shutil.copy(self.root / "id_ed25519.pub", self.root / "authorized_keys")
        (self.root / "sshd_config").write_text(SSHD_CONFIG.format(root=self.root))
        privsep = Path("/run/sshd")
        self.made_privsep = not privsep.exists()
        privsep.mkdir(mode=0o755, exist_ok=True)
        for host in self.hosts.hosts:
            log = open(self.root / f"sshd-{host.name}.log", "w")
            self.procs.append(self.hosts.popen(host, ["/usr/sbin/sshd", "-D", "-e", "-f", self.root / "sshd_config"],
                                               stdout=log, stderr=subprocess.STDOUT))
        for host in self.hosts.hosts:
            self._wait_listening(host)
        return self

    def _wait_listening(self, host: Host, timeout: float = 20) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection((host.ip, 22), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise NamespacesUnavailable(f"sshd on {host.name} did not listen within {timeout} s: "
                                    + (self.root / f"sshd-{host.name}.log").read_text()[-500:])

    @property
    def env(self) -> dict:
        """For the process that runs pdsh (DeepSpeed's runner): ssh with our key, no host key prompts."""
        return {"PDSH_SSH_ARGS_APPEND": f"-i {self.key} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                                        "-o LogLevel=ERROR -o BatchMode=yes"}

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []
        if self.made_privsep:
            shutil.rmtree("/run/sshd", ignore_errors=True)
