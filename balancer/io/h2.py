"""The asyncio driver of the HTTP/2 client side, and the choice of protocol per connection.

TLS listeners offer ALPN `h2,http/1.1` (when HTTP/2 is on) and the choice is known once the
handshake is done; plain listeners look at the first bytes for the HTTP/2 connection preface
(prior knowledge). Either way the transport is handed to the protocol chosen, once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from balancer.http1.client import ClientSide
from balancer.http1.exchange import ListenerContext
from balancer.http2.client import H2ClientSide
from balancer.io import lab
from balancer.io.client import ClientProtocol, ProxiedClientProtocol, peer_fin, track_client
from balancer.io.transport import TransportOps, nodelay
from balancer.lab.table import ConnRecord

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class H2ClientProtocol(TransportOps, H2ClientSide, asyncio.Protocol):
    def __init__(
        self,
        ctx: ListenerContext,
        accepted_at: float,
        client_ip: str | None = None,
        rec: ConnRecord | None = None,
    ) -> None:
        super().__init__(ctx)
        self.accepted_at = accepted_at  # the TCP accept (the TLS handshake time starts here)
        self.proxied_ip = client_ip  # from a PROXY header, when the listener reads one
        self.rec = rec  # the network lab's record, when HTTP/1.1 sniffing made it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        nodelay(transport)
        tls = None
        if self.rec is None:
            self.rec, tls = track_client(self.ctx, transport, self.accepted_at)
        peer = transport.get_extra_info("peername")
        ip = self.proxied_ip.encode() if self.proxied_ip else (peer[0].encode() if peer else None)
        self.opened(ip, tls)

    def eof_received(self) -> bool | None:
        peer_fin(self.rec)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        lab.closing(self.ctx.conns, self.rec, exc)
        super().connection_lost(exc)


def _h2_by_alpn(proto: ClientProtocol, transport: asyncio.BaseTransport) -> bool:
    """Hand the transport to HTTP/2 if the client chose `h2` in ALPN."""
    sslobj = transport.get_extra_info("ssl_object")
    if sslobj is None or sslobj.selected_alpn_protocol() != "h2":
        return False
    client_ip = getattr(proto, "proxied_ip", None)
    h2 = H2ClientProtocol(proto.ctx, proto.accepted_at, client_ip)
    transport.set_protocol(h2)
    h2.connection_made(transport)
    return True


class AlpnClientProtocol(ClientProtocol):
    """A TLS listener's connection: HTTP/2 when the client chose `h2` in ALPN."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not _h2_by_alpn(self, transport):
            super().connection_made(transport)


class ProxiedAlpnClientProtocol(ProxiedClientProtocol):
    """The same behind a PROXY header (`accept_proxy`): the real client's address either way."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not _h2_by_alpn(self, transport):
            super().connection_made(transport)


class SniffProtocol(ClientProtocol):
    """A plain listener's connection: HTTP/1.1 unless its first bytes are the HTTP/2
    connection preface (prior knowledge). It is an HTTP/1.1 connection from the start, so
    the connection limit, draining and the idle deadline apply before a byte arrives.
    (With HTTP/2 off the listener runs `ClientProtocol`, which answers a preface with a
    short 400.)"""

    sniffing = True
    sniffed = b""  # the start of a preface, until it is whole

    def data_received(self, data: bytes) -> None:
        # one check per packet on plain HTTP/2-enabled listeners (switching __class__ to
        # drop it broke keep-alive under uvloop: the second request's connection died)
        if not self.sniffing:
            ClientSide.data_received(self, data)
            return
        buf = self.sniffed + data if self.sniffed else data
        n = min(len(buf), len(PREFACE))
        if buf[:n] == PREFACE[:n] and n < len(PREFACE):
            self.sniffed = buf  # at most 23 bytes: wait for the rest of the preface
            return
        self.sniffing = False
        if not buf.startswith(PREFACE):
            ClientSide.data_received(self, buf)
            return
        # hand the transport to HTTP/2; this connection was counted as HTTP/1.1: undo that
        ctx = self.ctx
        self.closed = True
        ctx.clients.discard(self)
        ctx.stats.connections_open -= 1
        ctx.stats.connections_total -= 1
        # the lab's record goes with the transport (this protocol never sees its close)
        h2 = H2ClientProtocol(ctx, self.accepted_at, rec=self.rec)
        self.rec = None
        self.transport.set_protocol(h2)
        h2.connection_made(self.transport)
        h2.data_received(buf)


def http_protocol(ctx: ListenerContext, *, tls: bool, http2: bool) -> Callable[[], ClientProtocol]:
    """The protocol factory of an HTTP listener: HTTP/1.1 only, ALPN-chosen, or sniffed."""
    if not http2:
        return lambda: ClientProtocol(ctx)
    if tls:
        return lambda: AlpnClientProtocol(ctx)
    return lambda: SniffProtocol(ctx)


def proxied_protocol(
    ctx: ListenerContext, *, tls: bool, http2: bool
) -> Callable[[str | None], ClientProtocol]:
    """The same behind a PROXY header; HTTP/2 there only by ALPN (no prior knowledge)."""
    if http2 and tls:
        return lambda ip: ProxiedAlpnClientProtocol(ctx, ip)
    return lambda ip: ProxiedClientProtocol(ctx, ip)
