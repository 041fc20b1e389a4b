"""`--workers 2` through real processes (harness.LocalStack): the supervisor restarts a
killed worker, least connections sees every worker's requests, a drain, a reload and a
certificate reload reach every worker, SIGTERM drains them, and no worker outlives a
SIGKILLed supervisor."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from harness import BalancerProc, LoadLoop, LocalStack
from harness.procs import wait_until
from harness.stack import wait_gone

WORKERS = ("--workers", "2")


def get(port: int, path: str = "/", timeout: float = 10.0) -> tuple[int, str | None]:
    """(status, X-Backend) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.headers["X-Backend"]
    finally:
        conn.close()


def workers(bal: BalancerProc) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = bal.state()["workers"]
    return rows


def live_pids(bal: BalancerProc) -> list[int]:
    return [int(w["pid"]) for w in workers(bal) if w["alive"] and w["pid"]]


def both_served(bal: BalancerProc, port: int, before: list[int]) -> bool:
    """Send fresh-connection requests until every worker's count passed `before` (bounded)."""
    for _ in range(60):
        get(port)
        if wait_until(
            lambda: all(w["requests"] > b for w, b in zip(workers(bal), before, strict=True)),
            0.15,
        ):
            return True
    return False


@pytest.fixture
def stack() -> Iterator[LocalStack]:
    with LocalStack.ephemeral(balancer_args=WORKERS, check_interval=0.2) as st:
        bal = st.balancers[0]
        assert wait_until(
            lambda: len(live_pids(bal)) == 2 and all(w["listening"] for w in workers(bal)), 10
        )
        yield st


def test_a_killed_worker_comes_back_and_no_other_request_fails(stack: LocalStack) -> None:
    bal = stack.balancers[0]
    port = stack.service_port
    victim, other = live_pids(bal)
    with LoadLoop(lambda: get(port), duration=4.0) as load:
        time.sleep(1.0)
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: victim not in live_pids(bal) and len(live_pids(bal)) == 2, 3)
        load.wait()
    pids = live_pids(bal)
    assert other in pids and victim not in pids
    # at most the one request the victim held when it died (one client, one at a time)
    assert len(load.failures) <= 1, load.failures
    assert load.ok > 20
    kinds = [(e["kind"], e["detail"]) for e in bal.state()["events"]]
    assert any(k == "worker" and "SIGKILL" in d for k, d in kinds), kinds
    assert any(k == "worker" and "restarted" in d for k, d in kinds), kinds
    assert both_served(bal, port, [w["requests"] for w in workers(bal)])


def test_least_connections_counts_the_requests_of_every_worker() -> None:
    with LocalStack.ephemeral(balancer_args=WORKERS, algorithm="least-connections") as st:
        bal = st.balancers[0]
        port = st.service_port
        assert wait_until(lambda: all(w["listening"] for w in workers(bal)), 10)
        slow = [
            threading.Thread(target=get, args=(port, "/delay?ms=4000"), daemon=True)
            for _ in range(2)
        ]

        def in_flight() -> dict[str, int]:
            return {b["id"]: b["in_flight"] for b in bal.state()["backends"]}

        for t in slow:
            t.start()
        assert wait_until(lambda: sum(in_flight().values()) == 2, 3)
        counts = in_flight()
        # across workers, the second slow request went where the first was not
        assert sorted(counts.values()) == [0, 1, 1], counts
        least = min(counts, key=lambda b: counts[b])
        before = [w["requests"] for w in workers(bal)]
        picked = {get(port)[1] for _ in range(16)}
        # both workers answered some of them (their reports come every 0.1 s), and each
        # sent it to the backend with the fewest in-flight requests over all workers
        assert wait_until(
            lambda: all(w["requests"] > b for w, b in zip(workers(bal), before, strict=True)), 2
        ), (before, workers(bal))
        assert picked == {least}, (picked, counts)
        for t in slow:
            t.join(10)


def test_a_drain_reaches_every_worker(stack: LocalStack) -> None:
    bal = stack.balancers[0]
    port = stack.service_port
    ans = bal.admin("/api/backends/b1/drain", "POST")
    assert ans.status == 200
    time.sleep(0.2)  # the push is one loop turn; 0.2 s leaves room on a loaded machine
    before = [w["requests"] for w in workers(bal)]
    seen = {get(port)[1] for _ in range(30)}
    assert "b1" not in seen and seen == {"b2", "b3"}
    assert both_served(bal, port, before)
    bal.admin("/api/backends/b1/enable", "POST")
    assert wait_until(lambda: "b1" in {get(port)[1] for _ in range(6)}, 3)


def test_state_and_metrics_show_totals_and_every_worker(stack: LocalStack) -> None:
    bal = stack.balancers[0]
    port = stack.service_port
    assert both_served(bal, port, [w["requests"] for w in workers(bal)])

    # traffic has stopped: once the last reports are in, the totals are the workers' sums
    # (the supervisor serves no request itself; its counters are written every 50 ms)
    def summed() -> bool:
        state = bal.state()
        served = sum(w["requests"] for w in state["workers"])
        to_backends = sum(b["requests"] for b in state["backends"])
        return served > 0 and state["stats"]["requests_total"] == served == to_backends

    assert wait_until(summed, 3), bal.state()
    rows = workers(bal)
    assert [w["index"] for w in rows] == [0, 1]
    assert all(w["cpu_seconds"] > 0 and w["rss_bytes"] > 0 for w in rows)
    metrics = bal.admin("/metrics").body.decode()
    for i in (0, 1):
        for name in ("lb_worker_requests_total", "lb_worker_cpu_seconds_total"):
            assert f'{name}{{worker="{i}"}}' in metrics, name
        assert f'lb_worker_rss_bytes{{worker="{i}"}}' in metrics


def test_reload_and_certificate_reload_reach_every_worker(tmp_path: Path) -> None:
    pki = tmp_path / "pki"  # its own CA: renewing it touches no other test's certificates
    with LocalStack.ephemeral(balancer_args=WORKERS, tls=True, pki_dir=pki) as st:
        bal = st.balancers[0]
        assert wait_until(lambda: all(w["listening"] for w in workers(bal)), 10)
        status, _ = bal.post_reload()
        assert status == 200
        assert wait_until(lambda: all(w["reloads"] == 1 for w in workers(bal)), 3)
        os.kill(bal.pid, signal.SIGHUP)
        assert wait_until(lambda: all(w["reloads"] == 2 for w in workers(bal)), 3)

        old_serial = bal.state()["certificates"][0]["serial"]
        line = st.renew_cert()
        assert wait_until(lambda: all(w["cert_reloads"] >= 1 for w in workers(bal)), 5), line
        new_serial = bal.state()["certificates"][0]["serial"]
        ctx = ssl.create_default_context(cafile=st.ca_file)
        served = set()
        for _ in range(20):  # fresh connections: both workers' handshakes
            with (
                socket.create_connection((st.host, st.service_port), timeout=5) as raw,
                ctx.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                der = tls.getpeercert(binary_form=True)
                assert der is not None
                served.add(format(x509.load_der_x509_certificate(der).serial_number, "x"))
        assert new_serial != old_serial
        assert served == {new_serial}


def test_sigterm_drains_every_worker() -> None:
    with LocalStack.ephemeral(balancer_args=WORKERS) as st:
        bal = st.balancers[0]
        port = st.service_port
        assert wait_until(lambda: all(w["listening"] for w in workers(bal)), 10)
        pids = live_pids(bal)
        results: list[tuple[int, str | None]] = []
        slow = [
            threading.Thread(
                target=lambda: results.append(get(port, "/delay?ms=1500")), daemon=True
            )
            for _ in range(4)
        ]
        for t in slow:
            t.start()
        assert wait_until(lambda: bal.state()["stats"]["connections_open"] >= 4, 3)
        os.kill(bal.pid, signal.SIGTERM)
        for t in slow:
            t.join(10)
        assert [s for s, _ in results] == [200] * 4
        assert bal.popen is not None and bal.popen.wait(15) == 0
        assert wait_gone(pids, 5) == []


def test_no_worker_outlives_a_killed_supervisor() -> None:
    with LocalStack.ephemeral(balancer_args=WORKERS) as st:
        bal = st.balancers[0]
        assert wait_until(lambda: len(live_pids(bal)) == 2, 10)
        pids = live_pids(bal)
        os.kill(bal.pid, signal.SIGKILL)
        assert wait_gone(pids, 12) == []


def test_the_algorithm_and_a_weight_reach_every_worker(stack: LocalStack) -> None:
    bal = stack.balancers[0]
    port = stack.service_port
    ans = bal.admin("/api/algorithm", "PUT", json.dumps({"algorithm": "source-hash"}).encode())
    assert ans.status == 200
    time.sleep(0.2)
    before = [w["requests"] for w in workers(bal)]
    # one client address: source hash sends it to one backend, whichever worker serves it
    assert len({get(port)[1] for _ in range(20)}) == 1
    assert both_served(bal, port, before)
    ans = bal.admin("/api/algorithm", "PUT", json.dumps({"algorithm": "round-robin"}).encode())
    assert ans.status == 200
    ans = bal.admin("/api/backends/b3/weight", "PUT", json.dumps({"weight": 1000}).encode())
    assert ans.status == 200
    time.sleep(0.2)
    before = [w["requests"] for w in workers(bal)]
    assert {get(port)[1] for _ in range(20)} == {"b3"}  # b3 has 1000 of 1002 shares
    assert both_served(bal, port, before)
