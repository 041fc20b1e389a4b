"""Shared helpers: a tiny in-process aiohttp server (plain or HTTPS) that counts requests."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web


@dataclass
class Served:
    url: str
    requests: int = 0
    peers: set[tuple[str, int]] = field(default_factory=set)


async def _start(ssl_ctx: ssl.SSLContext | None) -> tuple[web.AppRunner, Served]:
    served = Served("")

    async def index(request: web.Request) -> web.Response:
        served.requests += 1
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            served.peers.add((peer[0], peer[1]))
        return web.Response(text="ok\n", headers={"X-Backend": "t1"})

    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=503, text="no\n", headers={"X-Backend": "t1"})

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return web.Response(text="late\n")

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/echo", index)
    app.router.add_get("/fail", fail)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_ctx)
    await site.start()
    port = runner.addresses[0][1]
    served.url = f"{'https' if ssl_ctx else 'http'}://127.0.0.1:{port}"
    return runner, served


ServerFactory = Callable[[ssl.SSLContext | None], Awaitable[Served]]


@pytest.fixture
async def serve() -> AsyncIterator[ServerFactory]:
    runners: list[web.AppRunner] = []

    async def factory(ssl_ctx: ssl.SSLContext | None = None) -> Served:
        runner, served = await _start(ssl_ctx)
        runners.append(runner)
        return served

    yield factory
    for runner in runners:
        await runner.cleanup()
