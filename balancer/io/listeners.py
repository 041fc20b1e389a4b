"""Binding the public listeners, in configuration order: HTTP(S) ones (`ClientProtocol`,
or behind the PROXY-header reader with `accept_proxy`) and TCP-mode ones (`Relay`)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import Callable

from balancer.config import Config, split_hostport
from balancer.http1.exchange import ListenerContext
from balancer.io.h2 import http_protocol, proxied_protocol
from balancer.io.proxied import ProxiedServer, listening_socket
from balancer.io.tcp import TcpClientProtocol
from balancer.tcp.relay import TcpContext

Server = asyncio.Server | ProxiedServer


async def bind_listeners(
    cfg: Config,
    ctx: ListenerContext,
    tcp: list[TcpContext],
    tls_for: Callable[[bool], ssl.SSLContext] | None,
    socks: list[socket.socket] | None = None,
) -> list[Server]:
    """One server per listener (`tcp` holds a context per TCP-mode listener, in order;
    `tls_for(http2)` gives the TLS context whose ALPN offers h2 or not).
    All or nothing: when one cannot bind, those bound already are closed again. A worker
    process passes the listening `socks` its supervisor bound, one per listener."""
    contexts = iter(tcp)
    servers: list[Server] = []
    try:
        for i, lst in enumerate(cfg.listeners):
            host, port = split_hostport(lst.listen, "listen")
            sock = socks[i] if socks is not None else None
            srv: Server
            tls = tls_for(lst.http2) if tls_for is not None and lst.mode != "tcp" else None
            # HTTP/2 beside HTTP/1.1 where the listener has it on
            plain = http_protocol(ctx, tls=tls is not None, http2=lst.http2)
            proxied = proxied_protocol(ctx, tls=tls is not None, http2=lst.http2)
            if lst.mode == "tcp":
                tctx = next(contexts)
                srv = await _create(
                    lambda c=tctx: TcpClientProtocol(c),  # type: ignore[misc]
                    sock,
                    host,
                    port,
                )
            elif lst.accept_proxy:
                srv = ProxiedServer(
                    sock if sock is not None else listening_socket(host, port),
                    lambda ip, _peer, proxied=proxied: proxied(ip),  # type: ignore[misc]
                    tuple(ipaddress.ip_network(c, strict=False) for c in lst.accept_proxy),
                    tls,
                    cfg.timeouts.client_hello,
                )
            else:
                srv = await _create(plain, sock, host, port, tls)
            servers.append(srv)
    except BaseException:
        for srv in servers:
            srv.close()
        raise
    return servers


async def _create(
    factory: Callable[[], asyncio.Protocol],
    sock: socket.socket | None,
    host: str,
    port: int,
    tls: ssl.SSLContext | None = None,
) -> asyncio.Server:
    """A server on `host:port`, or on the listening `sock` a supervisor bound."""
    loop = asyncio.get_running_loop()
    timeout = 5.0 if tls is not None else None
    if sock is not None:
        return await loop.create_server(factory, sock=sock, ssl=tls, ssl_handshake_timeout=timeout)
    return await loop.create_server(
        factory,
        host,
        port,
        ssl=tls,
        ssl_handshake_timeout=timeout,
        reuse_address=True,
        backlog=2048,
    )
