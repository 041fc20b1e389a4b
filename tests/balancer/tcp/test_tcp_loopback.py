"""TCP mode over real sockets: an in-process Balancer with an HTTP and a TCP listener side
by side, demo backends, raw servers for half-close, and TLS passthrough checked by curl
against our CA (the balancer holds no key)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backends.cli import make_server_ssl_context
from balancer.app import Balancer
from balancer.config import BackendSpec, ListenerSettings
from ca.core import init_ca
from harness import run_backend

IO = 10.0  # bound on every socket wait


def tcp_address(bal: Balancer) -> tuple[str, int]:
    [(_, host, port)] = [b for b in bal.bound() if b[0] == "tcp"]
    return host, port


def http_address(bal: Balancer) -> tuple[str, int]:
    [(_, host, port)] = [b for b in bal.bound() if b[0] != "tcp"]
    return host, port


async def keepalive_backends(addr: tuple[str, int], n: int) -> list[str]:
    """X-Backend of `n` requests on one keep-alive connection."""
    reader, writer = await asyncio.open_connection(*addr)
    seen = []
    try:
        for _ in range(n):
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO)
            fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line)
            length = int(fields.get(b"Content-Length", fields.get(b"content-length", b"0")))
            await asyncio.wait_for(reader.readexactly(length), IO)
            seen.append((fields.get(b"X-Backend") or fields[b"x-backend"]).decode())
    finally:
        writer.close()
    return seen


TWO_LISTENERS = {"more_listeners": (ListenerSettings("127.0.0.1:0", "tcp"),)}


async def test_layer4_pins_a_connection_layer7_spreads_it(start_balancer, make_backend):  # type: ignore[no-untyped-def]
    a, b = await make_backend("a"), await make_backend("b")
    bal = await start_balancer([a, b], **TWO_LISTENERS)
    assert [m for m, _, _ in bal.bound()] == ["http", "tcp"]
    tcp = await keepalive_backends(tcp_address(bal), 6)
    assert len(set(tcp)) == 1  # every request of the connection on one backend
    http = await keepalive_backends(http_address(bal), 6)
    assert set(http) == {"a", "b"}  # round-robin per request
    # the connection is counted on its backend once it has closed
    pinned = bal.cluster.backends[(a if tcp[0] == "a" else b).spec.id]
    for _ in range(100):  # bounded: the close reaches the relay within a loop turn or two
        if pinned.tcp_connections:
            break
        await asyncio.sleep(0.02)
    assert pinned.tcp_connections == 1 and pinned.tcp_bytes_out > 0
    view = bal.state_view()
    assert [lst["mode"] for lst in view["listener"]["all"]] == ["http", "tcp"]


@pytest.fixture
async def half_close_server() -> AsyncIterator[tuple[str, int]]:
    """Reads until the client's FIN, then answers how much it got and closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until EOF
        writer.write(b"got %d bytes" % len(data))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[:2]
    server.close()


async def test_half_close_is_carried_through(start_balancer, half_close_server):  # type: ignore[no-untyped-def]
    host, port = half_close_server
    bal = await start_balancer([BackendSpec(host, port)], mode="tcp", access_log=None)
    reader, writer = await asyncio.open_connection(*tcp_address(bal))
    writer.write(b"x" * 300_000)
    writer.write_eof()  # our FIN; the answer must still come back
    answer = await asyncio.wait_for(reader.read(), IO)
    writer.close()
    assert answer == b"got 300000 bytes"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_refused_backend_is_skipped(start_balancer, make_backend):  # type: ignore[no-untyped-def]
    live = await make_backend("live")
    dead = BackendSpec("127.0.0.1", closed_port(), name="dead")
    bal = await start_balancer([dead, live], mode="tcp")
    for _ in range(4):
        assert await keepalive_backends(tcp_address(bal), 1) == ["live"]
    assert bal.cluster.backends["dead"].errors_connect >= 1


async def test_hostile_prefaces_are_refused_others_served(start_balancer, make_backend):  # type: ignore[no-untyped-def]
    a = await make_backend("a")
    bal = await start_balancer(
        [
            BackendSpec("127.0.0.1", closed_port(), name="x", sni=("*.x.test",)),
            BackendSpec(a.host, a.port, name="plain"),  # takes what no name matches
        ],
        mode="tcp",
        accept_proxy=("10.0.0.0/8",),
    )
    addr = tcp_address(bal)
    hostile = [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nGET / HTTP/1.1\r\n\r\n",  # not a trusted source
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes(12),  # the same, v2
        b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\xff\xff\xff\xff",  # a broken ClientHello
        b"\x16\x03\x01\xff\xff" + b"\x01" * 100,  # a record longer than TLS allows
    ]
    for data in hostile:
        reader, writer = await asyncio.open_connection(*addr)
        writer.write(data)
        try:
            assert await asyncio.wait_for(reader.read(), IO) == b""
        except ConnectionResetError:
            pass  # closed with our bytes unread
        writer.close()
    assert bal.tcp[0].stats.refused == len(hostile)
    # everyone else is served, before and after
    assert await keepalive_backends(addr, 3) == ["a", "a", "a"]


# ---------------------------------------------------------------- passthrough with curl


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our CA with one certificate per site; the balancer gets none of the keys."""
    d = tmp_path_factory.mktemp("ca")
    ca = init_ca(d)
    ca.issue("site-a", dns=["a.example.test"])
    ca.issue("site-b", dns=["b.example.test", "*.b.example.test"])
    return d


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
async def test_tls_passthrough_by_sni_verified_by_curl(start_balancer, pki: Path) -> None:  # type: ignore[no-untyped-def]
    ctx_a = make_server_ssl_context(str(pki / "site-a.crt"), str(pki / "site-a.key"))
    ctx_b = make_server_ssl_context(str(pki / "site-b.crt"), str(pki / "site-b.key"))
    async with (
        run_backend("site-a", ssl_context=ctx_a) as a,
        run_backend("site-b", ssl_context=ctx_b) as b,
    ):
        bal = await start_balancer(
            [
                BackendSpec(a.host, a.port, name="a", sni=("a.example.test",)),
                BackendSpec(b.host, b.port, name="b", sni=("*.b.example.test", "b.example.test")),
            ],
            mode="tcp",
            health_check={"enabled": True, "type": "tcp"},
        )
        assert bal.tls_store is None  # no certificate, no key: it only reads the hello
        host, port = tcp_address(bal)

        async def curl(name: str) -> subprocess.CompletedProcess[str]:
            proc = await asyncio.create_subprocess_exec(
                "curl",
                "-sS",
                "--max-time",
                "10",
                "--cacert",
                str(pki / "ca.crt"),
                "--resolve",
                f"{name}:{port}:{host}",
                f"https://{name}:{port}/echo",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 20)
            return subprocess.CompletedProcess([], proc.returncode or 0, out.decode(), err.decode())

        for name, want in (
            ("a.example.test", "site-a"),
            ("b.example.test", "site-b"),
            ("api.b.example.test", "site-b"),
        ):
            res = await curl(name)
            assert res.returncode == 0, res.stderr
            body, _, code = res.stdout.rpartition("\n")
            assert code == "200" and json.loads(body)["backend"] == want
        # no backend takes this name and there is no default: an unrecognized_name alert
        res = await curl("c.example.test")
        assert res.returncode != 0 and "unrecognized name" in res.stderr.lower()


async def test_tcp_mode_connections_are_in_the_network_lab(start_balancer, half_close_server):  # type: ignore[no-untyped-def]
    """A relayed connection shows on both sides in /api/connections' table, with TCP_INFO,
    and the record says who sent the first FIN: the client here, then the backend."""
    host, port = half_close_server
    bal = await start_balancer([BackendSpec(host, port, name="raw")], mode="tcp", access_log=None)
    reader, writer = await asyncio.open_connection(*tcp_address(bal))
    writer.write(b"x" * 1000)
    await writer.drain()
    for _ in range(100):  # bounded: the relay connects within a few loop turns
        sides = {r["side"]: r for r in bal.lab.connections()["connections"]}
        if set(sides) == {"client", "backend"}:
            break
        await asyncio.sleep(0.02)
    assert sides["backend"]["backend"] == "raw" and sides["backend"]["state"] == "ESTABLISHED"
    assert sides["client"]["rtt_ms"] is not None
    writer.write_eof()  # the client's FIN first; the relay passes it on to the backend
    assert await asyncio.wait_for(reader.read(), IO) == b"got 1000 bytes"
    writer.close()
    for _ in range(100):
        closed = {r["side"]: r for r in bal.lab.connections(closed=True)["closed"]}
        if set(closed) == {"client", "backend"}:
            break
        await asyncio.sleep(0.02)
    assert closed["client"]["first_fin"] == "peer"  # the client closed first
    assert closed["backend"]["first_fin"] == "balancer"  # we passed its FIN on
    assert not bal.lab.connections()["connections"]
