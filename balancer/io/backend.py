"""The asyncio driver of the backend side: opens connections for the pool."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import cast

from balancer.http1.backend import BackendSide
from balancer.http1.exchange import Exchange, ListenerContext
from balancer.io import lab
from balancer.io.transport import TransportOps, nodelay
from balancer.lb.cluster import Backend


class BackendProtocol(TransportOps, BackendSide, asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        nodelay(transport)
        self.rec = lab.track(self.ctx.conns, "backend", transport, self.backend.id)

    def eof_received(self) -> bool | None:
        rec = self.rec
        if rec is not None and rec.fin is None:
            rec.fin = "peer"
        return None  # as asyncio.Protocol's: the transport closes our half

    def connection_lost(self, exc: Exception | None) -> None:
        lab.closing(self.ctx.conns, self.rec, exc)
        super().connection_lost(exc)


class Connector:
    """The pool's `open`: connect to a backend (TLS when configured) within the connect
    timeout, then report `connected` or `connect_failed` to the pool."""

    def __init__(
        self,
        ssl_context: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> None:
        self.ssl_context = ssl_context
        self.server_name = server_name

    def open(self, backend: Backend, ex: Exchange) -> None:
        asyncio.get_running_loop().create_task(self._connect(ex.client.ctx, backend, ex))

    def factory(self, ctx: ListenerContext, backend: Backend) -> Callable[[], BackendProtocol]:
        return lambda: BackendProtocol(ctx, backend)

    async def _connect(self, ctx: ListenerContext, backend: Backend, ex: Exchange) -> None:
        loop = asyncio.get_running_loop()
        tls = self.ssl_context
        try:
            async with asyncio.timeout(ctx.timeouts.connect):
                _, conn = await loop.create_connection(
                    self.factory(ctx, backend),
                    backend.host,
                    backend.port,
                    ssl=tls,
                    server_hostname=(self.server_name or backend.host) if tls else None,
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            kind = "timeout" if isinstance(exc, TimeoutError) else "connect"
            ctx.pool.connect_failed(backend, ex, kind)
            return
        ctx.pool.connected(conn, ex)
