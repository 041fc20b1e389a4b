"""The naive baseline proxy must be correct, or the comparison means nothing."""

from __future__ import annotations

import sys
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import naive_proxy


def test_forwardable_drops_hop_by_hop_and_connection_named() -> None:
    pairs = [
        ("Host", "x"),
        ("Connection", "keep-alive, X-Secret"),
        ("X-Secret", "1"),
        ("Transfer-Encoding", "chunked"),
        ("Content-Encoding", "gzip"),
    ]
    assert naive_proxy.forwardable(pairs) == [("Host", "x"), ("Content-Encoding", "gzip")]


async def test_round_robin_streaming_and_raw_bodies() -> None:
    async def make_backend(name: str) -> TestServer:
        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            return web.Response(
                body=name.encode() + b":" + body,
                headers={"Content-Encoding": "identity", "X-Method": request.method},
            )

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        return server

    backends = [await make_backend("a"), await make_backend("b")]
    proxy_app = naive_proxy.build_app([f"127.0.0.1:{s.port}" for s in backends])
    client = TestClient(TestServer(proxy_app, host="127.0.0.1"))
    await client.start_server()
    try:
        seen = []
        for i in range(4):
            resp = await client.post(f"/p?i={i}", data=b"payload")
            assert resp.status == 200
            assert resp.headers["X-Method"] == "POST"
            seen.append(await resp.read())
        assert seen == [b"a:payload", b"b:payload"] * 2
    finally:
        await client.close()
        for s in backends:
            await s.close()


async def test_dead_backend_gives_502() -> None:
    from harness import free_ports

    client = TestClient(
        TestServer(naive_proxy.build_app([f"127.0.0.1:{free_ports(1)[0]}"]), host="127.0.0.1")
    )
    await client.start_server()
    try:
        resp = await client.get("/")
        assert resp.status == 502
        assert await resp.text() == "bad gateway\n"
    finally:
        await client.close()
