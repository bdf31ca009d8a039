"""Several real hosts on one machine (network namespaces joined by a bridge, tests/support/multinode.py): the
SLURM templates on 2 hosts x 2 tasks against one host with 4 ranks, a run directory the hosts do not share, a
master that is missing or listens elsewhere, and a host that dies or drops off the network mid-run.

Root only (network namespaces); elsewhere every test skips with the reason. Tiny model, fp32, gloo.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import launch
from multinode import Hosts, NamespacesUnavailable, Sshd, unavailable_reason
from slurm_helpers import ENDED, job_env, job_log, running_cluster, start_cluster, stats_steps, wait_until_ended
from maskdit_ds.training.checkpoint import check_tag, list_tags
from repo import ROOT

TIMEOUT_S = 5  # dist.timeout_s of the failure tests: what a survivor waits before it gives up
TRAIN = [sys.executable, "-m", "maskdit_ds", "train", "--config", "digits", *launch.TINY]


def need_namespaces() -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def hosts():
    need_namespaces()
    made = Hosts(2).up()
    try:
        yield made
    finally:
        left = made.down()
        assert not left, f"left behind: {left}"


def rank_env() -> dict:
    return launch.env(PYTHONPATH=str(ROOT))


def wait_all(ranks, timeout: float) -> float:
    """Seconds until every rank ended; kills them and fails after `timeout`."""
    start = time.monotonic()
    for r in ranks:
        try:
            r.proc.wait(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            for other in ranks:
                other.proc.kill()
            pytest.fail(f"rank {r.rank} on {r.host.name} still runs after {timeout} s:\n{r.output()[-3000:]}")
    return time.monotonic() - start


# ---------------------------------------------------------------- the cluster itself


def test_multinode_cluster_up_and_down_leaves_nothing(tmp_path):
    """2 hosts + munged + slurmctld + 2 slurmd: up in under 30 s, every host resolves every other and runs srun
    tasks under its own name; down removes every namespace, link, hosts file and daemon."""
    need_namespaces()
    started = time.monotonic()
    made = Hosts(2).up()
    cluster = None
    try:
        cluster, reason = start_cluster(made)
        if cluster is None:
            pytest.skip(f"SLURM could not be started: {reason}")
        up_s = time.monotonic() - started
        assert up_s < 30, f"the cluster took {up_s:.1f} s to come up"
        out = subprocess.run(["srun", "--nodes=2", "--ntasks=4", "sh", "-c",
                              'echo "$SLURM_PROCID $(hostname) $(getent hosts node1 | cut -d" " -f1)"'],
                             env=cluster.env, capture_output=True, text=True, timeout=60)
        lines = sorted(out.stdout.split("\n")[:-1])
        assert lines == [f"0 node1 {made[0].ip}", f"1 node1 {made[0].ip}", f"2 node2 {made[0].ip}",
                         f"3 node2 {made[0].ip}"], out.stderr
        pids = dict(cluster.pids)
    finally:
        if cluster is not None:
            cluster.stop()
            shutil.rmtree(cluster.root, ignore_errors=True)
        left = made.down()
    assert left == []
    assert all(not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
               for pid in pids.values()), pids


# ---------------------------------------------------------------- SLURM: 2 hosts x 2 tasks


@pytest.fixture(scope="module")
def slurm(hosts):
    with running_cluster(hosts) as cluster:
        yield cluster


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(s["step"], s["loss"]) for s in launch.stats(run_dir)]


STEPS = 60  # a step takes ~0.05 s here: the USR1 must arrive before the last one
# 4 ranks x micro-batch 4 = the global batch of 16, no accumulation: the same ranks doing the same arithmetic
# whether they share one host or sit on two
FOUR_RANKS = ["train.micro_batch=4", "train.global_batch=16", f"train.steps={STEPS}", "train.ckpt_every=1000"]


@pytest.fixture(scope="module")
def one_host_4_ranks(tmp_path_factory) -> list[tuple[int, float]]:
    """(step, loss) of `deepspeed --num_gpus 4` on one host, uninterrupted: what the multi-host runs must equal."""
    need_namespaces()
    out = tmp_path_factory.mktemp("one_host")
    reference = launch.train(out, "r", FOUR_RANKS, ranks=4)
    assert reference.returncode == 0, reference.stdout[-3000:]
    return losses(out / "r")


def test_multinode_slurm_2x2_requeue_matches_one_host_4_ranks(slurm, one_host_4_ranks, tmp_path):
    """sbatch slurm/train_256.sh on 2 hosts x 2 tasks: USR1 mid-run -> checkpoint, exit 75, requeue, resume; the
    logged losses equal, bitwise, those of one host running 4 ranks uninterrupted."""
    out, logs = tmp_path / "runs", tmp_path / "logs"
    logs.mkdir()
    job = slurm.sbatch(["--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=30",
                        f"--output={logs}/%x-%j.out", "slurm/train_256.sh", *launch.TINY, *FOUR_RANKS],
                       env=job_env(out, "two_hosts"), cwd=ROOT)
    run = out / "two_hosts"
    deadline = time.monotonic() + 240
    while len(stats_steps(run)) < 2:
        assert time.monotonic() < deadline and slurm.job(job).get("JobState") not in ENDED, job_log(logs, job)
        time.sleep(0.2)
    slurm.scancel("--signal=USR1", job)  # what --signal=USR1@600 does before the time limit
    info = wait_until_ended(slurm, job, logs, timeout=400)
    log = job_log(logs, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{log[-4000:]}"
    assert "nodes=node[1-2] tasks=4" in log, log[-3000:]
    stopped = int(re.search(r"\[stop\] received SIGUSR1: saved step (\d+), exiting 75", log).group(1))
    assert 2 <= stopped < STEPS, f"the run ended before the signal arrived; raise STEPS\n{log[-3000:]}"
    assert f"[resume] from {run / 'checkpoints' / f'step_{stopped:07d}'}" in log
    assert all(check_tag(run / "checkpoints" / t) is None for t in list_tags(run / "checkpoints"))
    assert losses(run) == one_host_4_ranks  # bitwise: floats compared with ==
    assert [s for s, _ in losses(run)] == list(range(1, STEPS + 1))


# ---------------------------------------------------------------- DeepSpeed's own launcher: hostfile + pdsh/ssh


@pytest.fixture(scope="module")
def sshd(hosts, tmp_path_factory):
    try:
        daemons = Sshd(hosts, tmp_path_factory.mktemp("ssh")).start()
    except NamespacesUnavailable as err:
        pytest.skip(str(err))
    try:
        yield daemons
    finally:
        daemons.stop()


def test_multinode_deepspeed_hostfile_2x2_matches_one_host_4_ranks(hosts, sshd, one_host_4_ranks, tmp_path):
    """`deepspeed --hostfile` on node1 (2 slots each on node1 and node2): the runner reaches both hosts through
    pdsh and ssh (an sshd per host, a key made for the test) and starts DeepSpeed's per-node launcher there; the
    environment travels in .deepspeed_env. The losses equal, bitwise, one host's 4 ranks."""
    (tmp_path / "hostfile").write_text("node1 slots=2\nnode2 slots=2\n")
    # the runner forwards NCCL*/PYTHON*/... variables itself; the rest goes in .deepspeed_env in its directory
    (tmp_path / ".deepspeed_env").write_text("OMP_NUM_THREADS=1\nMKL_NUM_THREADS=1\nDS_ACCELERATOR=cpu\n"
                                             "HF_HUB_OFFLINE=1\n")
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--hostfile", str(tmp_path / "hostfile"),
           "--master_addr", "node1", "--master_port", str(launch.free_port()), "--launcher", "pdsh",
           "--no_ssh_check", "--module", "maskdit_ds", "train", "--config", "digits", *launch.TINY, *FOUR_RANKS,
           f"run.out_dir={tmp_path}", "run.name=ds"]
    # its own session: a Ctrl-C of pytest must not reach the runner, whose SIGINT handler runs `pkill -f python
    # -u -m deepspeed.launcher.launch` through pdsh on every host (these hosts share the machine's processes)
    proc = hosts.run(hosts[0], cmd, timeout=300, env={**rank_env(), **sshd.env}, cwd=tmp_path,
                     start_new_session=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    mapping = "global_rank_mapping=defaultdict(<class 'list'>, {'node1': [0, 1], 'node2': [2, 3]})"
    assert mapping in proc.stdout + proc.stderr
    assert losses(tmp_path / "ds") == one_host_4_ranks  # bitwise


# ---------------------------------------------------------------- start-up checks


def test_multinode_run_dir_not_shared_is_refused(hosts, tmp_path):
    """node2 sees an empty disk of its own where node1 has the run directory: both ranks refuse to start."""
    argv = [*TRAIN, f"run.out_dir={tmp_path}", "run.name=r", "train.steps=2"]
    ranks = hosts.start_ranks(1, argv, rank_env(), tmp_path, launch.free_port(),
                              private_dirs={"node2": [str(tmp_path)]})
    wait_all(ranks, 180)
    for r in ranks:
        assert r.proc.returncode == 2, r.output()[-3000:]
        assert (f"config error: run.out_dir: {tmp_path / 'r'} is not shared storage: host node2 (rank 1) does not "
                "see the file rank 0 on node1 wrote there") in r.output(), r.output()[-3000:]
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_multinode_missing_master_and_wrong_port_end_within_the_timeout(hosts, tmp_path):
    """Rank 1 alone (no master): it gives up after dist.timeout_s. Then both ranks, rank 1 on another
    MASTER_PORT: rank 1 cannot join, rank 0 waits for it in vain; both name the problem."""
    argv = [*TRAIN, f"run.out_dir={tmp_path}", "run.name=r", "train.steps=2", f"dist.timeout_s={TIMEOUT_S}"]
    port = launch.free_port()

    def start(rank: int, master_port: int) -> subprocess.Popen:
        env = {**rank_env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "node1",
               "MASTER_PORT": str(master_port)}
        return hosts.popen(hosts[rank], argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    alone = start(1, port)
    out = alone.communicate(timeout=180)[0]
    assert alone.returncode == 5, out[-3000:]
    assert (f"distributed error: rank 1 of 2 on node2: could not join rank 0's rendezvous at node1:{port} within "
            f"{TIMEOUT_S} s (dist.timeout_s)") in out, out[-3000:]

    master, elsewhere = start(0, port), start(1, port + 1)
    outs = [proc.communicate(timeout=180)[0] for proc in (master, elsewhere)]
    assert [master.returncode, elsewhere.returncode] == [5, 5], [o[-2000:] for o in outs]
    assert (f"rank 0 of 2 on node1: not all 2 ranks joined within {TIMEOUT_S} s (dist.timeout_s) at "
            f"node1:{port}") in outs[0], outs[0][-3000:]
    assert f"could not join rank 0's rendezvous at node1:{port + 1}" in outs[1], outs[1][-3000:]


# ---------------------------------------------------------------- losing a host mid-run


def lose_host(hosts, tmp_path, how: str):
    """Train on node1 + node2 (1 rank each), checkpoint every 3 steps; at step >= 5 `how` ends node2: every
    process killed, or its link cut. Returns (seconds until the survivor exited, survivor, run dir)."""
    run = tmp_path / how
    argv = [*TRAIN, f"run.out_dir={tmp_path}", f"run.name={how}", "train.steps=400", "train.ckpt_every=3",
            f"dist.timeout_s={TIMEOUT_S}"]
    ranks = hosts.start_ranks(1, argv, rank_env(), tmp_path / f"{how}_", launch.free_port())
    deadline = time.monotonic() + 240
    while not any(s["step"] >= 5 for s in launch.stats(run)):
        assert time.monotonic() < deadline and ranks[0].proc.poll() is None, ranks[0].output()[-3000:]
        time.sleep(0.05)
    lost_at = time.monotonic()
    if how == "kill":
        hosts.kill_all(hosts[1])
    else:
        hosts.set_link(hosts[1], up=False)
    try:
        ranks[0].proc.wait(timeout=120)
        exit_s = time.monotonic() - lost_at
        wait_all(ranks, 120)
    finally:
        hosts.set_link(hosts[1], up=True)
    return exit_s, ranks, run


@pytest.mark.parametrize("how", ["kill", "link_down"])
def test_multinode_lost_host_ends_the_run_naming_it_then_it_resumes(hosts, tmp_path, how):
    """The survivor exits 5 within dist.timeout_s (+ the heartbeat's few seconds) naming rank 1 on node2; a
    relaunch on both hosts resumes from the last complete checkpoint and trains on."""
    (tmp_path / f"{how}_").mkdir()
    exit_s, ranks, run = lose_host(hosts, tmp_path, how)
    survivor = ranks[0].output()
    assert ranks[0].proc.returncode == 5, survivor[-3000:]
    assert "distributed error: rank 0 on node1: lost rank 1 on node2" in survivor, survivor[-3000:]
    # killed: the peer's sockets close at once, then 3 s of heartbeats decide; link down: dist.timeout_s of
    # silence, checked every second. 15 s of slack for a loaded 2-core machine.
    bound = (3 if how == "kill" else TIMEOUT_S + 1) + 15
    assert exit_s < bound, f"survivor took {exit_s:.1f} s to exit\n{survivor[-2000:]}"
    if how == "link_down":  # the cut-off host gives up too, naming the master it cannot reach
        assert ranks[1].proc.returncode == 5
        assert "rank 1 on node2: rank 0's store at node1:" in ranks[1].output(), ranks[1].output()[-2000:]
    logged = max(s["step"] for s in launch.stats(run))
    tags = list_tags(run / "checkpoints")
    assert tags and all(check_tag(run / "checkpoints" / t) is None for t in tags), tags
    last = int(tags[-1].split("_")[1])
    print(f"[multinode] {how}: survivor exited {exit_s:.1f} s after the loss; logged step {logged}, last "
          f"complete checkpoint {last}: {logged - last} steps lost", flush=True)

    argv = [*TRAIN, f"run.out_dir={tmp_path}", f"run.name={how}", f"train.steps={last + 2}",
            "train.ckpt_every=3", f"dist.timeout_s={TIMEOUT_S}"]
    (tmp_path / "again").mkdir()
    again = hosts.start_ranks(1, argv, rank_env(), tmp_path / "again", launch.free_port())
    wait_all(again, 240)
    assert [r.proc.returncode for r in again] == [0, 0], again[0].output()[-3000:]
    assert f"[resume] from {run / 'checkpoints' / tags[-1]}" in again[0].output()
    assert [s["step"] for s in launch.stats(run)][-2:] == [last + 1, last + 2]


# ---------------------------------------------------------------- fewer hosts, and back


def test_multinode_resume_on_fewer_hosts_and_back(hosts, tmp_path):
    """4 ranks on 2 hosts; node2 gone for good: 2 ranks on node1 resume the same run (the world size differs, so
    the checkpoint is resharded through DeepSpeed's universal format without being asked); then 4 ranks on both
    hosts again. The data position carries over exactly (32 samples consumed divide by 2 and by 4), and the steps
    on 2 ranks equal those of one host's 2-rank launch resuming the same checkpoint."""
    run = tmp_path / "r"
    batch = ["train.micro_batch=4", "train.global_batch=16", "train.ckpt_every=2"]
    base = [*TRAIN, f"run.out_dir={tmp_path}", "run.name=r", *batch]

    def phase(name: str, steps: int, on) -> str:
        (tmp_path / name).mkdir()
        ranks = hosts.start_ranks(2, [*base, f"train.steps={steps}"], rank_env(), tmp_path / name,
                                  launch.free_port(), on=on)
        wait_all(ranks, 300)
        assert [r.proc.returncode for r in ranks] == [0] * len(ranks), ranks[0].output()[-3000:]
        return ranks[0].output()

    phase("four", 2, None)
    shutil.copytree(run, tmp_path / "ref")  # the same run, to be resumed by one host's launcher below
    two = phase("two", 4, [hosts[0]])
    assert (f"[reshard] {run / 'checkpoints' / 'step_0000002'} (4 ranks) -> "
            f"{run / 'checkpoints' / 'step_0000002' / 'universal'} for 2 ranks: step 2, 32 samples consumed this "
            "epoch, new per-rank position 16 (0 samples will be seen again)") in two, two[-3000:]
    # What the steps after the loss must be: a run that had 2 ranks from that checkpoint (`deepspeed --num_gpus 2`
    # on one host). The same 2 ranks from the same resharded state: equal bitwise, not only within a tolerance.
    reference = launch.train(tmp_path, "ref", [*batch, "train.steps=4"], ranks=2)
    assert reference.returncode == 0, reference.stdout[-3000:]
    assert losses(run)[2:] == losses(tmp_path / "ref")[2:] and len(losses(run)) == 4, reference.stdout[-5000:]
    four = phase("four_again", 6, None)
    assert (f"[reshard] {run / 'checkpoints' / 'step_0000004'} (2 ranks) -> "
            f"{run / 'checkpoints' / 'step_0000004' / 'universal'} for 4 ranks: step 4, 64 samples consumed this "
            "epoch, new per-rank position 16 (0 samples will be seen again)") in four, four[-3000:]
    assert [s["step"] for s in launch.stats(run)] == [1, 2, 3, 4, 5, 6]
    assert [s["images_seen"] for s in launch.stats(run)] == [16 * i for i in range(1, 7)]
