"""The asyncio driver of the HTTP/2 client side, and the choice of protocol per connection.

TLS listeners offer ALPN `h2,http/1.1` (when HTTP/2 is on) and the choice is known once the
handshake is done; plain listeners look at the first bytes for the HTTP/2 connection preface
(prior knowledge). Either way the transport is handed to the protocol chosen, once.
"""

from __future__ import annotations

import asyncio
from typing import cast

from balancer.http1.exchange import ListenerContext
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


class SniffProtocol(asyncio.Protocol):
    """A plain listener's connection until its first bytes say HTTP/2 (the preface) or not.
    (With HTTP/2 off the listener runs `ClientProtocol` alone, which answers a preface with
    a short 400.)"""

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        t = self.transport
        if t is None:
            return
        buf = self.buf + data
        n = min(len(buf), len(PREFACE))
        if buf[:n] == PREFACE[:n] and n < len(PREFACE):
            self.buf = buf  # at most 23 bytes: wait for the rest of the preface
            return
        h2 = buf.startswith(PREFACE)
        proto: asyncio.Protocol = H2ClientProtocol(self.ctx) if h2 else ClientProtocol(self.ctx)
        t.set_protocol(proto)
        proto.connection_made(t)
        if not t.is_closing():
            proto.data_received(buf)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
