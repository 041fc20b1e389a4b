"""The asyncio driver of the HTTP/1.1 client side: accepted sockets in, `ClientSide` decides."""

from __future__ import annotations

import asyncio
from typing import cast

from balancer.http1.client import ClientSide
from balancer.http1.exchange import ListenerContext
from balancer.io.transport import TransportOps, nodelay


class ClientProtocol(TransportOps, ClientSide, asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        nodelay(transport)
        peer = transport.get_extra_info("peername")
        sslobj = transport.get_extra_info("ssl_object")
        tls = None
        if sslobj is not None:
            cipher = sslobj.cipher()
            tls = (sslobj.version() or "", cipher[0] if cipher else "")
        self.opened(peer[0].encode() if peer else None, tls)


class ProxiedClientProtocol(ClientProtocol):
    """A connection whose PROXY header (read by `io.proxied`) named the real client."""

    def __init__(self, ctx: ListenerContext, client_ip: str | None) -> None:
        super().__init__(ctx)
        self.proxied_ip = client_ip

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.proxied_ip is not None:  # scheduling, X-Forwarded-For and the log use it
            self.client_ip = self.proxied_ip.encode()
