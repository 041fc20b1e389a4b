"""The asyncio driver of TCP mode: accepted sockets and backend connections around `Relay`.

The relay decides; these protocols only pass events in and carry out its transport
operations. `eof_received` returns True so a FIN from one side half-closes the connection
instead of closing it, and the relay passes the FIN on.
"""

from __future__ import annotations

import asyncio
from typing import cast

from balancer.io.transport import nodelay
from balancer.lb.cluster import Backend
from balancer.tcp.relay import Relay, TcpContext


class TransportEnd:
    """A `relay.End` over an asyncio transport."""

    __slots__ = ("abort", "close", "pause_reading", "resume_reading", "t", "write")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.t = transport
        # bound methods looked up once: the relay calls `write` on every chunk
        self.write = transport.write
        self.pause_reading = transport.pause_reading
        self.resume_reading = transport.resume_reading
        self.close = transport.close
        self.abort = transport.abort

    def write_eof(self) -> None:
        t = self.t
        if not t.is_closing() and t.can_write_eof():
            t.write_eof()


class TcpClientProtocol(asyncio.Protocol):
    """An accepted connection of a TCP-mode listener."""

    def __init__(self, ctx: TcpContext) -> None:
        self.ctx = ctx
        self.relay: Relay | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        nodelay(t)
        peer = t.get_extra_info("peername") or ("unknown", 0)
        local = t.get_extra_info("sockname") or ("0.0.0.0", 0)
        relay = Relay(self.ctx, TransportEnd(t), (peer[0], peer[1]), (local[0], local[1]))
        self.relay = relay
        self.data_received = relay.client_data  # type: ignore[method-assign]
        self.pause_writing = relay.client_pause_writing  # type: ignore[method-assign]
        self.resume_writing = relay.client_resume_writing  # type: ignore[method-assign]

    def data_received(self, data: bytes) -> None:  # replaced per connection
        if self.relay is not None:
            self.relay.client_data(data)

    def eof_received(self) -> bool:
        if self.relay is not None:
            self.relay.client_eof_received()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.relay is not None:
            self.relay.client_lost(exc is not None)


class TcpBackendProtocol(asyncio.Protocol):
    """The connection to the backend of one relay."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.data_received = relay.backend_data  # type: ignore[method-assign]
        self.pause_writing = relay.backend_pause_writing  # type: ignore[method-assign]
        self.resume_writing = relay.backend_resume_writing  # type: ignore[method-assign]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        nodelay(transport)

    def eof_received(self) -> bool:
        self.relay.backend_eof_received()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.backend_lost(exc is not None)


def open_backend(relay: Relay, backend: Backend, timeout: float, delay: float) -> None:
    """The context's `open`: after `delay`, connect within `timeout`, then tell the relay."""
    asyncio.get_running_loop().create_task(_connect(relay, backend, timeout, delay))


async def _connect(relay: Relay, backend: Backend, timeout: float, delay: float) -> None:
    loop = asyncio.get_running_loop()
    if delay:
        await asyncio.sleep(delay)
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(
                lambda: TcpBackendProtocol(relay), backend.host, backend.port
            )
    except TimeoutError:
        relay.connect_failed("timeout")
        return
    except OSError:
        relay.connect_failed("connect")
        return
    relay.backend_connected(TransportEnd(transport))
