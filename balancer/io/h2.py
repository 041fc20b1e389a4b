"""The asyncio driver of the HTTP/2 client side, and the choice of protocol per connection.

TLS listeners offer ALPN `h2,http/1.1` (when HTTP/2 is on) and the choice is known once the
handshake is done; plain listeners look at the first bytes for the HTTP/2 connection preface
(prior knowledge). Either way the transport is handed to the protocol chosen, once.
"""

from __future__ import annotations

import asyncio
from typing import cast

from balancer.http1.client import ClientSide
from balancer.http2.client import H2ClientSide
from balancer.io.client import ClientProtocol
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
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        nodelay(transport)
        self.opened(*_facts(transport))


class AlpnClientProtocol(ClientProtocol):
    """A TLS listener's connection: HTTP/2 when the client chose `h2` in ALPN."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is not None and sslobj.selected_alpn_protocol() == "h2":
            h2 = H2ClientProtocol(self.ctx)
            transport.set_protocol(h2)
            h2.connection_made(transport)
            return
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
