"""The network lab with `--workers 2` (real processes through harness.LocalStack, TLS):
/api/connections lists the workers' connections with their TCP_INFO and the pid of the
worker that holds each, /api/connections/{id} finds one in its worker, /api/tcp counts
the workers' sockets and lb_tcp_* / lb_tls_* sum the workers' samples and handshakes."""

from __future__ import annotations

import http.client
import json
import ssl
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from harness import BalancerProc, LocalStack
from harness.procs import wait_until

MAX_CONNECTIONS = 40  # opened until both workers hold one (the kernel hashes the 4-tuple)


def api(bal: BalancerProc, path: str) -> tuple[int, Any]:
    reply = bal.admin(path)
    return reply.status, json.loads(reply.body)


def test_the_lab_sees_every_workers_connections(tmp_path: Path) -> None:
    stack = LocalStack.ephemeral(
        tls=True,
        pki_dir=tmp_path / "pki",
        workdir=tmp_path / "run",
        balancer_args=("--workers", "2"),
    )
    conns: list[http.client.HTTPSConnection] = []
    with stack:
        bal = stack.balancers[0]
        assert wait_until(
            lambda: all(w["alive"] and w["listening"] for w in bal.state()["workers"]), 10
        )
        pids = {int(w["pid"]) for w in bal.state()["workers"]}
        assert len(pids) == 2
        assert stack.ca_file is not None
        ctx = ssl.create_default_context(cafile=stack.ca_file)
        try:
            mine: dict[str, dict[str, Any]] = {}  # our local address -> its record
            for _ in range(MAX_CONNECTIONS):
                c = http.client.HTTPSConnection(
                    "localhost", stack.service_port, context=ctx, timeout=5
                )
                c.request("GET", "/")
                assert c.getresponse().read() is not None
                conns.append(c)
                assert c.sock is not None
                status, body = api(bal, "/api/connections")
                assert status == 200
                ours = {f"127.0.0.1:{k.sock.getsockname()[1]}" for k in conns if k.sock}
                mine = {r["peer"]: r for r in body["connections"] if r["peer"] in ours}
                if {r["pid"] for r in mine.values()} == pids:
                    break
            assert len(mine) == len(conns), "every open client connection is listed"
            assert {r["pid"] for r in mine.values()} == pids, "both workers hold one"
            for r in mine.values():
                assert r["side"] == "client" and r["state"] == "ESTABLISHED"
                assert r["rtt_ms"] > 0 and r["cwnd"] >= 1
                assert r["tls"]["version"] == "TLSv1.3" and r["tls"]["sni"] == "localhost"
            backends = [r for r in body["connections"] if r["side"] == "backend"]
            assert {r["pid"] for r in backends} <= pids
            assert backends and all(r["rtt_ms"] > 0 and r["cwnd"] >= 1 for r in backends)

            # one connection in detail from each worker: its own process answers
            for pid in pids:
                row = next(r for r in mine.values() if r["pid"] == pid)
                status, detail = api(bal, f"/api/connections/{row['id']}")
                assert status == 200 and detail["id"] == row["id"] and detail["pid"] == pid
                assert detail["tcp_info"]["snd_mss"] > 0 and detail["history"]
                assert detail["syn"]["mss"] > 0
            assert api(bal, "/api/connections/999999")[0] == 404

            status, tcp = api(bal, "/api/tcp")
            assert status == 200
            assert tcp["listener"]["LISTEN"] == 2  # one SO_REUSEPORT socket per worker
            assert tcp["listener"]["ESTABLISHED"] >= len(conns)
            assert tcp["backend"].get("ESTABLISHED", 0) >= 1

            # the workers' samples and handshakes reach the supervisor's metrics
            def metrics() -> dict[str, Any]:
                text = bal.admin("/metrics").body.decode()
                return {f.name: f for f in text_string_to_metric_families(text)}

            def handshakes() -> float:
                kinds = metrics()["lb_tls_handshakes_by_kind"].samples
                return sum(s.value for s in kinds)

            # every handshake a worker counted (ours and the harness's readiness probe) is
            # in the lab's histogram too: two paths from the workers, one number
            def agree() -> bool:
                counted = bal.state()["stats"]["tls_handshakes"]
                return handshakes() == counted >= len(conns)

            assert wait_until(agree, 3), (handshakes(), bal.state()["stats"]["tls_handshakes"])
            families = metrics()
            rtt = [
                s
                for s in families["lb_tcp_rtt_seconds"].samples
                if s.name.endswith("_count") and s.value > 0
            ]
            assert {s.labels["backend"] for s in rtt} == {r["backend"] for r in backends}
            opened = {s.labels["side"]: s.value for s in families["lb_tcp_connections"].samples}
            assert opened["client"] == len(conns)
        finally:
            for c in conns:
                c.close()
        # the client closed first; the record is among its worker's closed ones
        closed_row = next(iter(mine.values()))

        def closed() -> list[dict[str, Any]]:
            rows: list[dict[str, Any]] = api(bal, "/api/connections?closed=1")[1]["closed"]
            return [r for r in rows if r["id"] == closed_row["id"]]

        assert wait_until(lambda: bool(closed()), 3)
        assert closed()[0]["first_fin"] == "peer" and closed()[0]["pid"] == closed_row["pid"]
