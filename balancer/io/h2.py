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
from balancer.io.client import ClientProtocol, ProxiedClientProtocol
from balancer.io.transport import TransportOps, nodelay

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _facts(transport: asyncio.BaseTransport) -> tuple[bytes | None, tuple[str, str] | None]:
    peer = transport.get_extra_info("peername")
    sslobj = transport.get_extra_info("ssl_object")
    tls = None
    if sslobj is not None:
        cipher = sslobj.cipher()
        tls = (sslobj.version() or "", cipher[0] if cipher else "")
    return (peer[0].encode() if peer else None), tls


class H2ClientProtocol(TransportOps, H2ClientSide, asyncio.Protocol):
    def __init__(self, ctx: ListenerContext, client_ip: str | None = None) -> None:
        super().__init__(ctx)
        self.proxied_ip = client_ip  # from a PROXY header, when the listener reads one

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        nodelay(transport)
        peer, tls = _facts(transport)
        self.opened(self.proxied_ip.encode() if self.proxied_ip else peer, tls)


def _h2_by_alpn(
    ctx: ListenerContext, transport: asyncio.BaseTransport, client_ip: str | None
) -> bool:
    """Hand the transport to HTTP/2 if the client chose `h2` in ALPN."""
    sslobj = transport.get_extra_info("ssl_object")
    if sslobj is None or sslobj.selected_alpn_protocol() != "h2":
        return False
    h2 = H2ClientProtocol(ctx, client_ip)
    transport.set_protocol(h2)
    h2.connection_made(transport)
    return True


class AlpnClientProtocol(ClientProtocol):
    """A TLS listener's connection: HTTP/2 when the client chose `h2` in ALPN."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not _h2_by_alpn(self.ctx, transport, None):
            super().connection_made(transport)


class ProxiedAlpnClientProtocol(ProxiedClientProtocol):
    """The same behind a PROXY header (`accept_proxy`): the real client's address either way."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not _h2_by_alpn(self.ctx, transport, self.proxied_ip):
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
        h2 = H2ClientProtocol(ctx)
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
