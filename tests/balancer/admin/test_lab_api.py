"""The network lab's API: /api/connections, /api/connections/{id}, /api/tcp and the
lb_tcp_* / lb_tls_* metrics, on an in-process TLS balancer with real connections."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from balancer.app import Balancer
from balancer.config import AdminSettings, TLSSettings
from ca.core import init_ca

TIMEOUT = aiohttp.ClientTimeout(total=10)
CONN_FIELDS = {
    "id", "side", "backend", "peer", "age_s", "state", "congestion", "first_fin", "time_wait",
    "rtt_ms", "rttvar_ms", "cwnd", "ssthresh", "total_retrans", "lost", "unacked", "snd_wnd",
    "rcv_wnd", "delivery_rate_bps", "bytes_sent", "bytes_received",
}  # fmt: skip


@pytest.fixture
def tls(tmp_path: Path) -> tuple[TLSSettings, ssl.SSLContext]:
    ca = init_ca(tmp_path / "ca")
    ca.issue("lb", dns=["localhost"], ips=["127.0.0.1"])
    settings = TLSSettings(certs=((str(ca.cert_path("lb")), str(ca.key_path("lb"))),))
    ctx = ssl.create_default_context(cafile=str(ca.directory / "ca.crt"))
    ctx.set_alpn_protocols(["http/1.1"])
    return settings, ctx


@pytest.fixture
async def lab(
    start_balancer: Callable[..., Awaitable[Balancer]],
    make_backend: Callable[..., Awaitable[Any]],
    tls: tuple[TLSSettings, ssl.SSLContext],
) -> tuple[Balancer, ssl.SSLContext]:
    backends = [await make_backend(f"b{i}") for i in range(2)]
    bal = await start_balancer(backends, tls=tls[0], admin=AdminSettings(listen="127.0.0.1:0"))
    return bal, tls[1]


async def _get(bal: Balancer, path: str) -> tuple[int, Any]:
    assert bal.admin is not None
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
        s.get(bal.admin.url + path) as resp,
    ):
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, await resp.text()


async def test_connections_show_both_sides_with_tcp_tls_and_syn(
    lab: tuple[Balancer, ssl.SSLContext],
) -> None:
    bal, ctx = lab
    _, port = bal.address
    conn = aiohttp.TCPConnector(ssl=ctx, limit=1)
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=conn) as s:
        for _ in range(4):  # one keep-alive client connection, both backends in turn
            async with s.get(f"https://localhost:{port}/") as resp:
                assert resp.status == 200
        status, body = await _get(bal, "/api/connections")
        assert status == 200
        rows = body["connections"]
        clients = [r for r in rows if r["side"] == "client"]
        backends = [r for r in rows if r["side"] == "backend"]
        assert len(clients) == 1 and {r["backend"] for r in backends} == set(bal.cluster.backends)
        for r in rows:
            assert r.keys() >= CONN_FIELDS, CONN_FIELDS - r.keys()
            assert r["state"] == "ESTABLISHED" and r["open"] is True
            assert r["rtt_ms"] > 0 and r["cwnd"] >= 1 and r["total_retrans"] == 0
            assert r["congestion"]
        c = clients[0]
        assert c["tls"]["version"] == "TLSv1.3" and c["tls"]["alpn"] == "http/1.1"
        assert c["tls"]["sni"] == "localhost" and c["tls"]["resumed"] is False
        assert c["tls"]["handshake_ms"] > 0
        assert c["syn"]["mss"] > 0 and c["syn"]["sack_permitted"] is True
        assert c["bytes_received"] > 0 and c["bytes_sent"] > 0

        status, detail = await _get(bal, f"/api/connections/{c['id']}")
        assert status == 200
        assert detail["id"] == c["id"] and detail["tcp_info"]["snd_mss"] > 0
        assert detail["history"] and {"t", "rtt_ms", "cwnd"} <= detail["history"][0].keys()
    # the client closed first: it holds TIME_WAIT; the record stays among the closed
    for _ in range(50):  # bounded: 50 x 20 ms for the balancer to see the FIN
        status, body = await _get(bal, "/api/connections?closed=1")
        gone = [r for r in body["closed"] if r["id"] == c["id"]]
        if gone:
            break
        await asyncio.sleep(0.02)
    assert gone and gone[0]["first_fin"] == "peer" and gone[0]["time_wait"] == "peer"


async def test_bad_ids_are_short_errors(lab: tuple[Balancer, ssl.SSLContext]) -> None:
    bal, _ = lab
    assert await _get(bal, "/api/connections/abc") == (
        400, {"error": "connection id must be a number"}
    )  # fmt: skip
    status, body = await _get(bal, "/api/connections/999999")
    assert status == 404 and "no connection 999999" in body["error"]
    status, body = await _get(bal, "/api/connections?closed=yes")
    assert status == 400


async def test_tcp_states_and_metrics(lab: tuple[Balancer, ssl.SSLContext]) -> None:
    bal, ctx = lab
    _, port = bal.address
    conn = aiohttp.TCPConnector(ssl=ctx, limit=1)
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=conn) as s:
        for _ in range(2):
            async with s.get(f"https://localhost:{port}/") as resp:
                assert resp.status == 200
        status, tcp = await _get(bal, "/api/tcp")
        assert status == 200
        assert tcp["listener"]["LISTEN"] == 1 and tcp["listener"]["ESTABLISHED"] == 1
        assert tcp["backend"]["ESTABLISHED"] == 2
        assert tcp["listen_queues"][0]["address"].endswith(f":{port}")
        assert tcp["listen_queues"][0]["backlog"] > 0
        assert isinstance(tcp["listen_overflows"], int)
        await _get(bal, "/api/connections")  # a look samples TCP_INFO
        status, text = await _get(bal, "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    rtt = families["lb_tcp_rtt_seconds"]
    counts = {s.labels["backend"] for s in rtt.samples if s.name.endswith("_count") and s.value}
    assert counts == set(bal.cluster.backends)
    retrans = families["lb_tcp_retransmits"].samples
    assert {s.labels["backend"] for s in retrans} == set(bal.cluster.backends)
    kinds = families["lb_tls_handshakes_by_kind"].samples
    assert [(s.labels["version"], s.labels["resumption"], s.value) for s in kinds] == [
        ("TLSv1.3", "full", 1.0)
    ]
    hs = [
        s
        for s in families["lb_tls_handshake_duration_seconds"].samples
        if s.name.endswith("_count")
    ]
    assert hs[0].value == 1.0
