"""The asyncio driver of TCP mode: accepted sockets and backend connections around `Relay`.

The relay decides; these protocols only pass events in and carry out its transport
operations. `eof_received` returns True so a FIN from one side half-closes the connection
instead of closing it, and the relay passes the FIN on.
"""

from __future__ import annotations

import asyncio
from typing import cast

from balancer.io import lab
from balancer.io.transport import nodelay
from balancer.lab.table import Closer, ConnRecord, ConnTable, Side
from balancer.lb.cluster import Backend
from balancer.tcp.relay import Relay, TcpContext


class TransportEnd:
    """A `relay.End` over an asyncio transport."""

    __slots__ = ("pause_reading", "rec", "resume_reading", "t", "write")

    def __init__(self, transport: asyncio.Transport, rec: ConnRecord | None = None) -> None:
        self.t = transport
        self.rec = rec  # the network lab's record: who sent the first FIN
        # bound methods looked up once: the relay calls `write` on every chunk
        self.write = transport.write
        self.pause_reading = transport.pause_reading
        self.resume_reading = transport.resume_reading

    def _ours(self, how: Closer) -> None:
        rec = self.rec
        if rec is not None and rec.fin is None:
            rec.fin = how

    def write_eof(self) -> None:
        t = self.t
        if not t.is_closing() and t.can_write_eof():
            self._ours("balancer")
            t.write_eof()

    def close(self) -> None:
        self._ours("balancer")
        self.t.close()

    def abort(self) -> None:
        self._ours("reset")
        self.t.abort()


def _track(
    conns: ConnTable | None, side: Side, t: asyncio.Transport, backend: str | None = None
) -> ConnRecord | None:
    return lab.track(conns, side, t, backend) if conns is not None else None


def _peer_fin(rec: ConnRecord | None) -> None:
    if rec is not None and rec.fin is None:
        rec.fin = "peer"


def _lost(conns: ConnTable | None, rec: ConnRecord | None, exc: Exception | None) -> None:
    if conns is not None:
        lab.closing(conns, rec, exc)


class TcpClientProtocol(asyncio.Protocol):
    """An accepted connection of a TCP-mode listener."""

    def __init__(self, ctx: TcpContext) -> None:
        self.ctx = ctx
        self.relay: Relay | None = None
        self.rec: ConnRecord | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        nodelay(t)
        peer = t.get_extra_info("peername") or ("unknown", 0)
        local = t.get_extra_info("sockname") or ("0.0.0.0", 0)
        self.rec = rec = _track(self.ctx.conns, "client", t)
        end = TransportEnd(t, rec)
        relay = Relay(self.ctx, end, (peer[0], peer[1]), (local[0], local[1]))
        self.relay = relay
        self.data_received = relay.client_data  # type: ignore[method-assign]
        self.pause_writing = relay.client_pause_writing  # type: ignore[method-assign]
        self.resume_writing = relay.client_resume_writing  # type: ignore[method-assign]

    def data_received(self, data: bytes) -> None:  # replaced per connection
        if self.relay is not None:
            self.relay.client_data(data)

    def eof_received(self) -> bool:
        _peer_fin(self.rec)
        if self.relay is not None:
            self.relay.client_eof_received()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        _lost(self.ctx.conns, self.rec, exc)
        if self.relay is not None:
            self.relay.client_lost(exc is not None)


class TcpBackendProtocol(asyncio.Protocol):
    """The connection to the backend of one relay."""

    def __init__(self, relay: Relay, backend: str) -> None:
        self.relay = relay
        self.backend = backend
        self.rec: ConnRecord | None = None
        self.data_received = relay.backend_data  # type: ignore[method-assign]
        self.pause_writing = relay.backend_pause_writing  # type: ignore[method-assign]
        self.resume_writing = relay.backend_resume_writing  # type: ignore[method-assign]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        nodelay(transport)
        t = cast(asyncio.Transport, transport)
        self.rec = _track(self.relay.ctx.conns, "backend", t, self.backend)

    def eof_received(self) -> bool:
        _peer_fin(self.rec)
        self.relay.backend_eof_received()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        _lost(self.relay.ctx.conns, self.rec, exc)
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
            transport, proto = await loop.create_connection(
                lambda: TcpBackendProtocol(relay, backend.id), backend.host, backend.port
            )
    except TimeoutError:
        relay.connect_failed("timeout")
        return
    except OSError:
        relay.connect_failed("connect")
        return
    relay.backend_connected(TransportEnd(transport, proto.rec))
