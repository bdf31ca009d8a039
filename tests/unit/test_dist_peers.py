"""dist.py's many-host pieces without a process group: the watchdog judging heartbeats in a real TCPStore, the
messages for a lost rank and for a rendezvous that fails, and which errors count as a lost peer."""
import threading
import time

import pytest
import torch.distributed as tdist

from maskdit_ds import dist
from maskdit_ds.errors import PeerLost


@pytest.fixture
def two_hosts(monkeypatch):
    """Rank 0 of 2 on host a (rank 1 on host b), with a rendezvous store served here."""
    port = dist.free_port()
    server = tdist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "_hosts", ["a", "b"])
    monkeypatch.setattr(dist, "host", lambda: "a")
    monkeypatch.setattr(dist, "HEARTBEAT_S", 0.2)
    yield server


def watchdog(timeout_s: float) -> tuple[dist.Watchdog, list[str]]:
    failures = []
    dog = dist.Watchdog.__new__(dist.Watchdog)
    dog.fail = lambda message: (failures.append(message), dog.stop.set())  # instead of os._exit
    dog.__init__(timeout_s)
    return dog, failures


def test_watchdog_names_the_rank_whose_heartbeat_stopped(two_hosts):
    client = dist._store(timeout_s=5)
    beating = threading.Event()
    beating.set()

    def rank1():  # beats while `beating` is set, like rank 1's own watchdog
        while beating.is_set():
            client.add(dist.ALIVE_KEY.format(1), 1)
            time.sleep(0.1)

    threading.Thread(target=rank1, daemon=True).start()
    dog, failures = watchdog(timeout_s=1.0)
    time.sleep(2.0)  # twice the timeout with rank 1 alive: no verdict
    assert failures == []
    beating.clear()  # rank 1 dies
    deadline = time.monotonic() + 5
    while not failures and time.monotonic() < deadline:
        time.sleep(0.05)
    assert failures == ["rank 0 on a: lost rank 1 on b (no heartbeat for 1 s (dist.timeout_s): the process died, the "
                        "host went down or its network is cut); this rank stops too"]
    assert int(client.add(dist.ALIVE_KEY.format(0), 0)) > 0  # rank 0 beat all along


def test_lost_peers_are_named_and_other_errors_pass(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "_hosts", ["a", "a", "b", "b"])
    monkeypatch.setattr(dist, "host", lambda: "a")
    monkeypatch.setattr(dist, "lost_ranks", lambda: [2, 3])
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.12]:4000")
    with pytest.raises(PeerLost, match=r"^rank 0 on a: lost ranks 2, 3 on b \(no heartbeat for 3 s after a "
                                       r"collective failed: .*\(\[gloo/transport/tcp/pair.cc:553\] Connection"):
        with dist.naming_lost_peers():
            raise gloo
    with pytest.raises(ValueError, match="not a collective"):  # not a communication failure: unchanged
        with dist.naming_lost_peers():
            raise ValueError("not a collective")
    monkeypatch.setattr(dist, "lost_ranks", lambda: [])  # everyone alive: the original error stands
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        with dist.naming_lost_peers():
            raise gloo
    monkeypatch.setattr(dist, "lost_ranks", lambda: None)  # the store is gone with rank 0's host
    monkeypatch.setenv("MASTER_ADDR", "node1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(PeerLost, match=r"rank 0's store at node1:29500 \(host a\) cannot be reached"):
        with dist.naming_lost_peers():
            raise gloo


@pytest.mark.parametrize("rank, cause, expected", [
    ("1", "The client socket has timed out after 5000ms while trying to connect to (node1, 29500).",
     r"^rank 1 of 2 on a: could not join rank 0's rendezvous at node1:29500 within 5 s \(dist.timeout_s\): the "
     r"master is not running"),
    ("0", "Timed out after 6 seconds waiting for clients. 1/2 clients joined.",
     r"^rank 0 of 2 on a: not all 2 ranks joined within 5 s \(dist.timeout_s\) at node1:29500: a host was never "
     r"started"),
    ("0", "The server socket has failed to listen on any local network address. port: 29500, code: -98, name: "
          "EADDRINUSE", r"^rank 0 of 2 on a: MASTER_PORT 29500 is already in use on this host"),
])
def test_a_rendezvous_that_fails_says_why(monkeypatch, rank, cause, expected):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "node1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setattr(dist, "host", lambda: "a")
    with pytest.raises(PeerLost, match=expected):
        with dist.joining(5):
            raise tdist.DistNetworkError(cause)
