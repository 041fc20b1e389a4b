"""The asyncio driver of the HTTP/1.1 client side: accepted sockets in, `ClientSide` decides."""

from __future__ import annotations

import asyncio
import time
from typing import cast

from balancer.http1.client import ClientSide
from balancer.http1.exchange import ListenerContext
from balancer.io import lab
from balancer.io.transport import TransportOps, nodelay
from balancer.lab.table import ConnRecord


class ClientProtocol(TransportOps, ClientSide, asyncio.Protocol):
    def __init__(self, ctx: ListenerContext) -> None:
        super().__init__(ctx)
        # the factory runs at the TCP accept, before any TLS handshake
        self.accepted_at = time.perf_counter()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        nodelay(transport)
        peer = transport.get_extra_info("peername")
        self.rec, tls = track_client(self.ctx, transport, self.accepted_at)
        self.opened(peer[0].encode() if peer else None, tls)

    def eof_received(self) -> bool | None:
        peer_fin(self.rec)
        return None  # as asyncio.Protocol's: the transport closes our half

    def connection_lost(self, exc: Exception | None) -> None:
        lab.closing(self.ctx.conns, self.rec, exc)
        super().connection_lost(exc)


def track_client(
    ctx: ListenerContext, transport: asyncio.BaseTransport, accepted_at: float
) -> tuple[ConnRecord, tuple[str, str] | None]:
    """The network lab's record of an accepted connection, and its (TLS version, cipher)."""
    conns = ctx.conns
    rec = lab.track(conns, "client", transport)
    sslobj = transport.get_extra_info("ssl_object")
    if sslobj is None:
        return rec, None
    facts = lab.tls_facts(sslobj, time.perf_counter() - accepted_at)
    conns.tls_done(rec, facts)
    return rec, (facts.version, facts.cipher)


def peer_fin(rec: ConnRecord | None) -> None:
    """eof_received: the peer sent the first FIN unless we had already sent ours."""
    if rec is not None and rec.fin is None:
        rec.fin = "peer"


class ProxiedClientProtocol(ClientProtocol):
    """A connection whose PROXY header (read by `io.proxied`) named the real client."""

    def __init__(self, ctx: ListenerContext, client_ip: str | None) -> None:
        super().__init__(ctx)
        self.proxied_ip = client_ip

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.proxied_ip is not None:  # scheduling, X-Forwarded-For and the log use it
            self.client_ip = self.proxied_ip.encode()
