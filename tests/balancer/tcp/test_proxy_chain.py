"""The PROXY protocol end to end on loopback: a TCP-mode balancer sends it, an HTTP
listener and the demo backend accept it, and a header from another source is refused."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web

from backends import cli
from backends.app import make_app
from balancer.app import Balancer
from balancer.config import BackendSpec
from balancer.tcp.proxy import encode

IO = 10.0


@pytest.fixture
async def proxy_backend() -> AsyncIterator[Callable[[str], object]]:
    """`await proxy_backend(cidrs)`: the demo backend with --accept-proxy, in-process."""
    runners: list[tuple[web.AppRunner, object]] = []

    async def start(cidrs: str) -> BackendSpec:
        app = make_app("px")
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        nets = tuple(ipaddress.ip_network(c) for c in cidrs.split(","))
        args = argparse.Namespace(host="127.0.0.1", port=0, accept_proxy=nets)
        server = cli._proxied_site(runner, app, args, None)
        runners.append((runner, server))
        return BackendSpec("127.0.0.1", server.sockets[0].getsockname()[1], name="px")

    yield start  # type: ignore[misc]
    for runner, server in runners:
        server.close()  # type: ignore[attr-defined]
        await runner.cleanup()


async def exchange(addr: tuple[str, int], data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(), IO)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def address(bal: Balancer) -> tuple[str, int]:
    _, host, port = bal.bound()[0]
    return host, port


GET = b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
REAL = ("192.0.2.55", 40001)


def echo(answer: bytes) -> dict[str, object]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:200]
    return json.loads(body)  # type: ignore[no-any-return]


async def test_tcp_mode_passes_the_real_client_to_the_backend(start_balancer, proxy_backend):  # type: ignore[no-untyped-def]
    backend = await proxy_backend("127.0.0.0/8")
    lines: list[str] = []
    bal = await start_balancer(
        [backend],
        mode="tcp",
        accept_proxy=("127.0.0.0/8",),
        proxy_protocol="v2",
        health_check={"enabled": True, "type": "http"},
    )
    bal.tcp[0].access_log = lines.append
    # the check sends a LOCAL header first, so the backend is seen up
    for _ in range(100):
        if bal.cluster.backends["px"].last_check:
            break
        await asyncio.sleep(0.05)
    assert bal.cluster.backends["px"].last_check is True
    header = encode("v1", REAL, ("127.0.0.1", 1))
    assert echo(await exchange(address(bal), header + GET))["client"] == REAL[0]
    for _ in range(100):
        if lines:
            break
        await asyncio.sleep(0.02)
    assert json.loads(lines[0])["client"] == REAL[0]


async def test_http_listener_takes_the_client_from_the_header(  # type: ignore[no-untyped-def]
    start_balancer, make_backend
):
    plain = await make_backend("plain")
    front = await start_balancer([plain], accept_proxy=("127.0.0.0/8",))
    relay = await start_balancer(
        [BackendSpec(*address(front))],
        mode="tcp",
        accept_proxy=("127.0.0.0/8",),
        proxy_protocol="v2",
    )
    # a client known to the relay as 192.0.2.55 reaches the backend with that address
    answer = echo(await exchange(address(relay), encode("v2", REAL, ("127.0.0.1", 1)) + GET))
    assert ["X-Forwarded-For", REAL[0]] in answer["headers"]
    # straight to the HTTP listener: a trusted source must send a header
    assert await exchange(address(front), GET) == b""


async def test_a_header_from_another_source_is_refused(start_balancer, make_backend):  # type: ignore[no-untyped-def]
    plain = await make_backend("plain")
    bal = await start_balancer([plain], accept_proxy=("192.0.2.0/24",))
    assert await exchange(address(bal), encode("v1", REAL, ("127.0.0.1", 1)) + GET) == b""
    answer = echo(await exchange(address(bal), GET))  # no header: served as usual
    assert ["X-Forwarded-For", "127.0.0.1"] in answer["headers"]


async def test_a_header_split_over_segments_is_read_whole(start_balancer, make_backend):  # type: ignore[no-untyped-def]
    plain = await make_backend("plain")
    bal = await start_balancer([plain], accept_proxy=("127.0.0.0/8",))
    header = encode("v2", REAL, ("127.0.0.1", 1))
    reader, writer = await asyncio.open_connection(*address(bal))
    writer.write(header[:7])
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(header[7:] + GET)
    answer = echo(await asyncio.wait_for(reader.read(), IO))
    writer.close()
    assert ["X-Forwarded-For", REAL[0]] in answer["headers"]


async def test_a_silent_trusted_client_is_closed_after_the_preface_timeout(  # type: ignore[no-untyped-def]
    start_balancer, make_backend
):
    plain = await make_backend("plain")
    bal = await start_balancer(
        [plain], accept_proxy=("127.0.0.0/8",), timeouts={"client_hello": 0.3}
    )
    reader, writer = await asyncio.open_connection(*address(bal))
    writer.write(b"PROXY TCP4 192.0.2.1")  # never finished
    try:  # closed with our bytes unread: a reset, or a plain end
        assert await asyncio.wait_for(reader.read(), IO) == b""
    except ConnectionResetError:
        pass
    writer.close()
    assert bal.servers[0].refused == 1
