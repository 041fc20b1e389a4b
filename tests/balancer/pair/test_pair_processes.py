"""The active/passive pair in local mode: two real balancer processes on loopback.

Each balancer has its own backend (named after the node), so the X-Backend header of a
response through the shared service address says which balancer served it.
Roles are read from each balancer's admin API (`GET /api/state`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
INTERVAL = 0.2  # the shipped default advert interval
TAKEOVER_BOUND_S = 5.0  # generous: this is an integration test, not a benchmark


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


# loopback only: never through an HTTP(S)_PROXY from the environment
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def served_by(port: int, timeout: float = 0.5) -> str | None:
    """Which backend answered through the service address, or None if nothing did."""
    try:
        with _http.open(f"http://127.0.0.1:{port}/", timeout=timeout) as resp:
            return resp.headers.get("X-Backend") if resp.status == 200 else None
    except (OSError, urllib.error.URLError):
        return None


class Proc:
    def __init__(self, argv: list[str], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process must be able to die
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        finally:
            self._log.close()


class Node(Proc):
    """One balancer of the pair, with its own backend and admin API."""

    def __init__(
        self, cluster: Cluster, name: str, priority: int, election: int, peer: int, extra: list[str]
    ) -> None:
        self.name = name
        self.admin = free_port()
        argv = [
            sys.executable,
            "-m",
            "balancer",
            "--listen",
            f"127.0.0.1:{cluster.service}",
            "--backend",
            f"127.0.0.1:{cluster.backends[name]}",
            "--peer",
            f"127.0.0.1:{peer}",
            "--bind-election",
            f"127.0.0.1:{election}",
            "--priority",
            str(priority),
            "--advert-interval",
            str(INTERVAL),
            "--secret-file",
            str(cluster.secret),
            "--admin",
            f"127.0.0.1:{self.admin}",
            *extra,
        ]
        super().__init__(argv, cluster.tmp / f"{name}-{len(cluster.procs)}.log")

    def state(self) -> dict[str, Any] | None:
        try:
            url = f"http://127.0.0.1:{self.admin}/api/state"
            with _http.open(url, timeout=0.5) as resp:
                data: dict[str, Any] = json.load(resp)
                return data
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def role(self) -> str | None:
        state = self.state()
        return None if state is None else str(state["role"])


class Cluster:
    """Two nodes "hi" and "lo", a backend each; everything is killed in close()."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.secret = tmp / "pair.secret"
        self.secret.write_text("test-pair-secret\n")
        self.service = free_port()
        self.elections = {"hi": free_port(socket.SOCK_DGRAM), "lo": free_port(socket.SOCK_DGRAM)}
        self.backends: dict[str, int] = {}
        self.procs: list[Proc] = []
        for name in ("hi", "lo"):
            port = free_port()
            self.backends[name] = port
            argv = [sys.executable, "-m", "backends", "--host", "127.0.0.1"]
            argv += ["--port", str(port), "--name", name]
            self.procs.append(Proc(argv, tmp / f"backend-{name}.log"))
        for name, port in self.backends.items():
            assert wait_for(partial(_connects, port), 15), f"backend {name} did not start"

    def node(self, name: str, priority: int, *extra: str, wait_admin: bool = True) -> Node:
        other = "lo" if name == "hi" else "hi"
        node = Node(self, name, priority, self.elections[name], self.elections[other], list(extra))
        self.procs.append(node)
        if wait_admin:
            assert wait_for(lambda: node.state() is not None, 15), f"{name} admin: {node.log()}"
        return node

    def pair(self, *extra: str) -> tuple[Node, Node]:
        """Start hi (150) first and wait until it serves, then lo (100): no start-up race."""
        hi = self.node("hi", 150, *extra)
        assert wait_for(lambda: served_by(self.service) == "hi", 10), hi.log()
        lo = self.node("lo", 100, *extra)
        # passive is also the start-up role: wait until each has heard the other
        assert wait_for(lambda: lo.role() == "passive" and _peer_seen(lo), 5), lo.log()
        assert wait_for(lambda: _peer_seen(hi), 5), hi.log()
        return hi, lo

    def takeover(self, sig: signal.Signals, victim: Node, to: str) -> float:
        start = time.monotonic()
        victim.proc.send_signal(sig)
        assert wait_for(lambda: served_by(self.service, 0.2) == to, TAKEOVER_BOUND_S, 0.01), (
            f"no takeover after {sig.name}"
        )
        return time.monotonic() - start

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.kill()


def _peer_seen(node: Node) -> bool:
    state = node.state()
    return state is not None and state["role_detail"].get("peer") is not None


def _connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


def test_higher_priority_becomes_active_and_serves(cluster: Cluster) -> None:
    hi, lo = cluster.pair()
    assert served_by(cluster.service) == "hi"
    assert hi.role() == "active"
    assert lo.role() == "passive"
    state = hi.state()
    assert state is not None
    assert state["role_detail"]["mode"] == "local"
    assert state["role_detail"]["peer"]["node"].endswith(f":{cluster.elections['lo']}")
    assert "role passive -> active" in hi.log()


def test_passive_counts_its_healthy_backends(cluster: Cluster) -> None:
    # a passive serves no traffic; it must still report its backends, or the tracking
    # penalty (no backends while the peer has some) drops its priority to the floor.
    # Watched through hi's view of its peer: lo's admin API would refresh lo's cluster itself.
    hi = cluster.node("hi", 150)
    assert wait_for(lambda: served_by(cluster.service) == "hi", 10), hi.log()
    cluster.node("lo", 100, wait_admin=False)

    def peer() -> dict[str, Any]:
        state = hi.state()
        return (state or {}).get("role_detail", {}).get("peer") or {}

    assert wait_for(lambda: peer().get("healthy_backends") == 1, 10), peer()
    assert served_by(cluster.service) == "hi"
    time.sleep(5 * INTERVAL)
    assert peer()["priority"] == 100
    assert peer()["healthy_backends"] == 1


def test_sigkill_active_passive_takes_over(cluster: Cluster) -> None:
    hi, lo = cluster.pair()
    took = cluster.takeover(signal.SIGKILL, hi, "lo")
    print(f"SIGKILL takeover (local mode, interval {INTERVAL} s): {took:.3f} s")
    assert lo.role() == "active"
    assert "master down" in lo.log()


def test_sigterm_active_resigns_and_passive_takes_over(cluster: Cluster) -> None:
    hi, lo = cluster.pair()
    took = cluster.takeover(signal.SIGTERM, hi, "lo")
    print(f"SIGTERM takeover (local mode): {took:.3f} s")
    assert hi.proc.wait(timeout=15) == 0
    assert "role active -> passive (resigned)" in hi.log()
    assert "peer resigned" in lo.log()
    state = lo.state()
    assert state is not None and state["role"] == "active"
    assert state["role_detail"]["last_transition"]["reason"] == "peer resigned"


def test_sigstop_then_sigcont_leaves_exactly_one_active(cluster: Cluster) -> None:
    hi, lo = cluster.pair()
    hi.proc.send_signal(signal.SIGSTOP)
    try:
        # lo wins the election, but the frozen hi still holds the service port (local mode)
        assert wait_for(lambda: lo.role() == "active", TAKEOVER_BOUND_S), lo.log()
        # local-mode limitation: the kernel still queues connections for the frozen process,
        # so lo cannot bind the port and clients get no answer until SIGCONT
        assert served_by(cluster.service, 0.3) is None
        time.sleep(3)
        during = lo.state()
    finally:
        hi.proc.send_signal(signal.SIGCONT)
    assert during is not None
    detail = during["role_detail"]
    print(f"during SIGSTOP lo: role={during['role']} listen_error={detail.get('listen_error')}")
    assert during["role"] == "active" and "listen_error" in detail
    assert detail["effective_priority"] < 100  # tracking: a failing listener costs priority

    def one_active() -> bool:
        roles = sorted([str(hi.role()), str(lo.role())])
        return roles == ["active", "passive"]

    assert wait_for(one_active, TAKEOVER_BOUND_S), (hi.log(), lo.log())
    # and it stays that way (a few advert intervals), with the service answering
    time.sleep(5 * INTERVAL)
    assert one_active()
    # hi still holds the port and outranks lo's penalised priority: hi stays active
    assert hi.role() == "active"
    assert wait_for(lambda: served_by(cluster.service) == "hi", TAKEOVER_BOUND_S)


def test_preempt_restarted_higher_priority_takes_back(cluster: Cluster) -> None:
    hi, lo = cluster.pair()
    cluster.takeover(signal.SIGTERM, hi, "lo")
    hi.proc.wait(timeout=15)
    hi2 = cluster.node("hi", 150)
    assert wait_for(lambda: served_by(cluster.service) == "hi", TAKEOVER_BOUND_S), hi2.log()
    assert wait_for(lambda: lo.role() == "passive", TAKEOVER_BOUND_S), lo.log()
    assert hi2.role() == "active"


def test_no_preempt_restarted_higher_priority_stays_passive(cluster: Cluster) -> None:
    hi, lo = cluster.pair("--no-preempt")
    cluster.takeover(signal.SIGTERM, hi, "lo")
    hi.proc.wait(timeout=15)
    hi2 = cluster.node("hi", 150, "--no-preempt")
    assert wait_for(lambda: hi2.role() == "passive", 5), hi2.log()
    time.sleep(10 * INTERVAL)  # well past the master-down time (~0.7 s)
    assert hi2.role() == "passive"
    assert lo.role() == "active"
    assert served_by(cluster.service) == "lo"


def test_equal_priorities_elect_exactly_one(cluster: Cluster) -> None:
    # same priority is fine: the address breaks the tie
    a = cluster.node("hi", 100)
    b = cluster.node("lo", 100)

    def one_active() -> bool:
        return sorted([str(a.role()), str(b.role())]) == ["active", "passive"]

    assert wait_for(one_active, TAKEOVER_BOUND_S), (a.log(), b.log())
    time.sleep(5 * INTERVAL)
    assert one_active()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--secret-file": "missing"}, "pair.secret_file (--secret-file) names a file that is"),
        ({"--priority": "0"}, "pair.priority (--priority) must be between 1 and 254"),
        ({"--priority": "255"}, "pair.priority (--priority) must be between 1 and 254"),
        ({"--vip": "10.9.0.100/24"}, "pair.vip_interface (--vip-interface) is required"),
        ({"--vip": "10.9.0.300/24", "--vip-interface": "eth0"}, "pair.vip (--vip) must be"),
        ({"--vip": "10.9.0.100", "--vip-interface": "eth0"}, "pair.vip (--vip) must be"),
        ({"--peer": "127.0.0.1:7946"}, "pair.peer (--peer) is this node itself"),
    ],
)
def test_bad_pair_settings_are_refused(
    tmp_path: Path, change: dict[str, str], message: str
) -> None:
    secret = tmp_path / "s"
    secret.write_text("x\n")
    flags = {
        "--listen": "127.0.0.1:1",
        "--backend": "127.0.0.1:2",
        "--peer": "127.0.0.1:7947",
        "--bind-election": "127.0.0.1:7946",
        "--priority": "100",
        "--secret-file": str(secret),
    }
    flags.update(change)
    if flags["--secret-file"] == "missing":
        flags["--secret-file"] = str(tmp_path / "missing")
    argv = [sys.executable, "-m", "balancer"]
    for key, value in flags.items():
        argv += [key, value]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=30, env=env)
    assert res.returncode == 2
    assert message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stdout == ""
