"""A SLURM cluster of N hosts on this machine (network namespaces, see multinode.py), kept running between
commands; `bash tools/local_cluster.sh` is the way in:

  up N              N hosts node1..nodeN, munged, slurmctld, one slurmd per host; prints how to use it
  exec HOST CMD...  run CMD on HOST (its network namespace and host name)
  status            the hosts and `sinfo`
  down              stop everything and remove every namespace, link and file `up` made

State (the SLURM config, logs, and what `down` must remove) lives in $MASKDIT_CLUSTER_DIR
(default /tmp/maskdit_local_cluster).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# run by tools/local_cluster.sh, which puts tests/support and the checkout on PYTHONPATH
from multinode import Hosts, NamespacesUnavailable
from slurm_helpers import LocalCluster, SlurmUnavailable, ensure_installed

STATE_DIR = Path(os.environ.get("MASKDIT_CLUSTER_DIR", "/tmp/maskdit_local_cluster"))
STATE = STATE_DIR / "state.json"


def up(n: int) -> int:
    if STATE.exists():
        print(f"a cluster is already up (state in {STATE}); run `down` first", file=sys.stderr)
        return 1
    started = time.monotonic()
    hosts = Hosts(n)
    slurm_root = STATE_DIR / "slurm"
    try:
        hosts.up()
        ensure_installed()
        slurm_root.mkdir(parents=True, exist_ok=True)
        for folder in (STATE_DIR, slurm_root):
            folder.chmod(0o755)  # the munge user must reach its socket directory
        cluster = LocalCluster(slurm_root, hosts)
        _save(hosts, cluster)  # before start: a failed start is still torn down by `down`
        cluster.start()
        _save(hosts, cluster)
    except (NamespacesUnavailable, SlurmUnavailable) as err:
        print(f"local cluster could not start: {err}", file=sys.stderr)
        down()
        return 1
    print(f"up in {time.monotonic() - started:.1f} s: "
          + ", ".join(f"{h.name}={h.ip}" for h in hosts.hosts) + f" (slurmctld on {hosts.gateway})")
    print(f"export SLURM_CONF={cluster.conf}    # then sbatch/srun/sinfo as usual")
    return 0


def _save(hosts: Hosts, cluster: LocalCluster) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    STATE.write_text(json.dumps({"hosts": hosts.to_dict(), "slurm_root": str(cluster.root), "pids": cluster.pids}))


def _load() -> tuple[Hosts, LocalCluster]:
    state = json.loads(STATE.read_text())
    hosts = Hosts.from_dict(state["hosts"])
    cluster = LocalCluster(Path(state["slurm_root"]), hosts)
    cluster.pids = state["pids"]
    return hosts, cluster


def down() -> int:
    if not STATE.exists():
        print(f"no cluster is up (no {STATE})")
        return 0
    hosts, cluster = _load()
    cluster.stop()
    left = hosts.down()
    if left:
        print(f"could not remove: {', '.join(left)}", file=sys.stderr)
        return 1
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    print("down: no namespace, link, hosts file or daemon left")
    return 0


def exec_on(name: str, cmd: list[str]) -> int:
    hosts, _ = _load()
    host = next((h for h in hosts.hosts if h.name == name), None)
    if host is None:
        print(f"no host {name!r}; hosts: {', '.join(h.name for h in hosts.hosts)}", file=sys.stderr)
        return 2
    return subprocess.run(hosts.command(host, cmd)).returncode


def status() -> int:
    if not STATE.exists():
        print("no cluster is up")
        return 1
    hosts, cluster = _load()
    for h in hosts.hosts:
        print(f"{h.name} {h.ip} netns={h.netns}")
    return subprocess.run(["sinfo", "-N"], env=cluster.env).returncode


def main(argv: list[str]) -> int:
    if argv[:1] == ["up"] and len(argv) == 2 and argv[1].isdigit() and int(argv[1]) >= 1:
        return up(int(argv[1]))
    if argv == ["down"]:
        return down()
    if argv == ["status"]:
        return status()
    if argv[:1] == ["exec"] and len(argv) >= 3:
        return exec_on(argv[1], argv[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
