"""The active/passive pair in local mode: two real balancer processes on loopback.

Each balancer has its own backend (named after the node), so the X-Backend header of a
response through the shared service address says which balancer served it.
Roles are read from each balancer's admin API (`GET /api/state`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness import (
    REPO,
    BackendProc,
    BalancerProc,
    Harness,
    free_port,
    free_ports,
    pair_args,
    wait_until,
)

INTERVAL = 0.2  # the shipped default advert interval
TAKEOVER_BOUND_S = 5.0  # how long to wait for a takeover before failing (not a benchmark)

# loopback only: never through an HTTP(S)_PROXY from the environment
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def served_by(port: int, timeout: float = 0.5) -> str | None:
    """Which backend answered through the service address, or None if nothing did."""
    try:
        with _http.open(f"http://127.0.0.1:{port}/", timeout=timeout) as resp:
            return resp.headers.get("X-Backend") if resp.status == 200 else None
    except (OSError, urllib.error.URLError):
        return None


def wait_for(pred: Callable[[], object], timeout: float, step: float = 0.02) -> bool:
    return wait_until(pred, timeout, step)


class Cluster:
    """Two nodes "hi" and "lo", a backend each, started through the test's harness."""

    def __init__(self, harness: Harness, tmp: Path) -> None:
        self.harness = harness
        self.secret = tmp / "pair.secret"
        self.secret.write_text("test-pair-secret\n")
        self.service = free_port()
        hi, lo = free_ports(2, kind=socket.SOCK_DGRAM)  # held together: they differ
        self.elections = {"hi": hi, "lo": lo}
        self.backends: dict[str, BackendProc] = {n: harness.backend(n) for n in ("hi", "lo")}

    def node(self, name: str, priority: int, *extra: str) -> BalancerProc:
        """A node whose admin API answers; it starts passive, so it need not listen yet."""
        other = "lo" if name == "hi" else "hi"
        return self.harness.balancer(
            *("--listen", f"127.0.0.1:{self.service}"),
            *("--backend", self.backends[name].address, "--admin", "127.0.0.1:0"),
            *pair_args(
                election=self.elections[name],
                peer=self.elections[other],
                priority=priority,
                secret_file=self.secret,
                advert_interval=INTERVAL,
            ),
            *extra,
            name=name,
            listens=False,
        )

    def pair(self, *extra: str) -> tuple[BalancerProc, BalancerProc]:
        """Start hi (150) first and wait until it serves, then lo (100): no start-up race."""
        hi = self.node("hi", 150, *extra)
        assert wait_for(lambda: served_by(self.service) == "hi", 10), hi.output()
        lo = self.node("lo", 100, *extra)
        # passive is also the start-up role: wait until each has heard the other
        assert wait_for(lambda: lo.role() == "passive" and _peer_seen(lo), 5), lo.output()
        assert wait_for(lambda: _peer_seen(hi), 5), hi.output()
        return hi, lo

    def takeover(self, sig: signal.Signals, victim: BalancerProc, to: str) -> float:
        start = time.monotonic()
        victim.signal(sig)
        assert wait_for(lambda: served_by(self.service, 0.2) == to, TAKEOVER_BOUND_S, 0.01), (
            f"no takeover after {sig.name}"
        )
        return time.monotonic() - start


def _state(node: BalancerProc) -> dict[str, Any] | None:
    try:
        return node.state()
    except (OSError, RuntimeError, ValueError):
        return None


def _peer_seen(node: BalancerProc) -> bool:
    state = _state(node)
    return state is not None and state["role_detail"].get("peer") is not None


@pytest.fixture
def cluster(harness: Harness, tmp_path: Path) -> Cluster:
    return Cluster(harness, tmp_path)


def test_higher_priority_becomes_active_and_serves(cluster: Cluster) -> None:
    hi, lo = cluster.pair()
    assert served_by(cluster.service) == "hi"
    assert hi.role() == "active"
    assert lo.role() == "passive"
    state = _state(hi)
    assert state is not None
    assert state["role_detail"]["mode"] == "local"
    assert state["role_detail"]["peer"]["node"].endswith(f":{cluster.elections['lo']}")
    assert "role passive -> active" in hi.output()


def test_passive_counts_its_healthy_backends(cluster: Cluster) -> None:
    # a passive serves no traffic; it must still report its backends, or the tracking
    # penalty (no backends while the peer has some) drops its priority to the floor.
    # Watched through hi's view of its peer: lo's admin API would refresh lo's cluster itself.
    hi = cluster.node("hi", 150)
    assert wait_for(lambda: served_by(cluster.service) == "hi", 10), hi.output()
    cluster.node("lo", 100)

    def peer() -> dict[str, Any]:
        state = _state(hi)
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
    assert "master down" in lo.output()


def test_sigterm_active_resigns_and_passive_takes_over(cluster: Cluster) -> None:
    hi, lo = cluster.pair()
    took = cluster.takeover(signal.SIGTERM, hi, "lo")
    print(f"SIGTERM takeover (local mode): {took:.3f} s")
    assert hi.wait(timeout=15) == 0
    assert "role active -> passive (resigned)" in hi.output()
    assert "peer stepped down" in lo.output()
    state = _state(lo)
    assert state is not None and state["role"] == "active"
    assert state["role_detail"]["last_transition"]["reason"] == "peer stepped down"


def test_sigstop_then_sigcont_leaves_exactly_one_active(cluster: Cluster) -> None:
    hi, lo = cluster.pair()
    hi.signal(signal.SIGSTOP)
    try:
        # lo wins the election, but the frozen hi still holds the service port (local mode)
        assert wait_for(lambda: lo.role() == "active", TAKEOVER_BOUND_S), lo.output()
        # local-mode limitation: the kernel still queues connections for the frozen process,
        # so lo cannot bind the port and clients get no answer until SIGCONT
        assert served_by(cluster.service, 0.3) is None
        time.sleep(3)
        during = _state(lo)
    finally:
        hi.signal(signal.SIGCONT)
    assert during is not None
    detail = during["role_detail"]
    print(f"during SIGSTOP lo: role={during['role']} listen_error={detail.get('listen_error')}")
    assert during["role"] == "active" and "listen_error" in detail
    assert detail["effective_priority"] < 100  # tracking: a failing listener costs priority

    def one_active() -> bool:
        roles = sorted([str(hi.role()), str(lo.role())])
        return roles == ["active", "passive"]

    assert wait_for(one_active, TAKEOVER_BOUND_S), (hi.output(), lo.output())
    # and it stays that way (a few advert intervals), with the service answering
    time.sleep(5 * INTERVAL)
    assert one_active()
    # hi still holds the port and outranks lo's penalised priority: hi stays active
    assert hi.role() == "active"
    assert wait_for(lambda: served_by(cluster.service) == "hi", TAKEOVER_BOUND_S)


def test_preempt_restarted_higher_priority_takes_back(cluster: Cluster) -> None:
    hi, lo = cluster.pair()
    cluster.takeover(signal.SIGTERM, hi, "lo")
    hi.wait(timeout=15)
    hi2 = cluster.node("hi", 150)
    assert wait_for(lambda: served_by(cluster.service) == "hi", TAKEOVER_BOUND_S), hi2.output()
    assert wait_for(lambda: lo.role() == "passive", TAKEOVER_BOUND_S), lo.output()
    assert hi2.role() == "active"


def test_killed_active_restarts_and_preempts_with_one_role_change_each(cluster: Cluster) -> None:
    """SIGKILL hi, lo takes over, hi restarts and takes back: one role event on each side
    (the restarted node used to be handed the role before it knew its backends, then bounce
    it back and forth: four changes, one of them "peer resigned")."""
    hi, lo = cluster.pair()
    cluster.takeover(signal.SIGKILL, hi, "lo")
    hi.wait(timeout=15)
    restarted_at = time.time()
    hi2 = cluster.node("hi", 150)
    assert wait_for(lambda: served_by(cluster.service) == "hi", TAKEOVER_BOUND_S), hi2.output()
    assert wait_for(lambda: lo.role() == "passive", TAKEOVER_BOUND_S), lo.output()

    def role_events(node: BalancerProc) -> list[str]:
        state = _state(node)
        assert state is not None
        return [e["detail"] for e in state["events"] if e["kind"] == "role"]

    lo_changes = [d for d in role_events(lo) if d.startswith("active -> passive")]
    assert len(lo_changes) == 1, (lo_changes, lo.output())
    assert role_events(hi2) == [d for d in role_events(hi2) if d.startswith("passive -> active")]
    assert len(role_events(hi2)) == 1, hi2.output()
    lo_state = _state(lo)
    assert lo_state is not None
    after = [e for e in lo_state["events"] if e["kind"] == "role" and e["ts"] >= restarted_at]
    assert len(after) == 1, after
    assert "resigned" not in hi2.output()


def test_no_preempt_restarted_higher_priority_stays_passive(cluster: Cluster) -> None:
    hi, lo = cluster.pair("--no-preempt")
    cluster.takeover(signal.SIGTERM, hi, "lo")
    hi.wait(timeout=15)
    hi2 = cluster.node("hi", 150, "--no-preempt")
    assert wait_for(lambda: hi2.role() == "passive", 5), hi2.output()
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

    assert wait_for(one_active, TAKEOVER_BOUND_S), (a.output(), b.output())
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
    res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=30, env=env)
    assert res.returncode == 2
    assert message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stdout == ""
