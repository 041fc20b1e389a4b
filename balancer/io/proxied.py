"""An HTTP(S) listener that accepts a PROXY protocol header (`accept_proxy`).

The header comes before anything else on the connection, before the TLS handshake too, so
it is read off the accepted socket here (peeked, then exactly its length received) and the
socket is handed to asyncio afterwards (`connect_accepted_socket`, TLS included): the
HTTP/1.1 core never sees the header, only the client address it carried. From a source
outside `accept_proxy`, a connection that starts like a PROXY header is closed; the others
are served as usual. Reading the header is bounded in bytes (`proxy.parse`) and in time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable

from balancer.tcp import proxy

log = logging.getLogger("balancer.proxied")

PEEK = 536  # a v1 line or a v2 header with its addresses and a few TLVs


class ProxiedServer:
    """The listening socket and its accept task; `sockets` and `close()` as asyncio.Server."""

    def __init__(
        self,
        sock: socket.socket,
        factory: Callable[[str | None, tuple[str, int]], asyncio.Protocol],
        trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
        ssl_context: ssl.SSLContext | None,
        timeout: float,
    ) -> None:
        self.sockets = [sock]
        # called with the client address the header carried (or None) and the socket's peer
        self.factory = factory
        self.trusted = trusted
        self.ssl_context = ssl_context
        self.timeout = timeout
        self.refused = 0
        self.pending: set[asyncio.Task[None]] = set()
        self.task = asyncio.get_running_loop().create_task(self._accept())

    def close(self) -> None:
        self.task.cancel()
        for t in list(self.pending):
            t.cancel()
        self.sockets[0].close()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        listener = self.sockets[0]
        while True:
            try:
                conn, peer = await loop.sock_accept(listener)
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.05)  # e.g. EMFILE: do not spin
                continue
            conn.setblocking(False)
            task = loop.create_task(self._serve(conn, (peer[0], peer[1])))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

    async def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        source = peer[0]
        try:
            async with asyncio.timeout(self.timeout):
                client = await self._read_header(conn, source)
        except (TimeoutError, OSError, ValueError) as exc:
            self.refused += 1
            log.info("PROXY header from %s refused: %s", source, exc or "timeout")
            conn.close()
            return
        try:
            await loop.connect_accepted_socket(
                lambda: self.factory(client, peer),
                conn,
                ssl=self.ssl_context,
                ssl_handshake_timeout=5.0 if self.ssl_context is not None else None,
            )
        except (OSError, ssl.SSLError, TimeoutError):
            conn.close()

    async def _read_header(self, conn: socket.socket, source: str) -> str | None:
        """The client address of a trusted source's header; None for an untrusted source
        whose first bytes are not a header. ValueError: close the connection."""
        is_trusted = proxy.trusted(source, self.trusted)
        data = b""
        for _ in range(PEEK):  # each round waits for more bytes: bounded by count and time
            data = await _peek(conn, PEEK, partial=bool(data))
            if not data:
                raise ValueError("closed before its first bytes")
            if not is_trusted:
                looks = proxy.looks_like_header(data)
                if looks:
                    raise ValueError("a PROXY header from a source not in accept_proxy")
                if looks is False:
                    return None
                continue
            header = proxy.parse(data)
            if header.status == "invalid":
                raise ValueError(header.reason)
            if header.status == "ok":
                _recv_exactly(conn, header.consumed)
                return header.source[0] if header.source is not None else None
        raise ValueError("header never completed")


async def _peek(conn: socket.socket, n: int, partial: bool) -> bytes:
    """The bytes waiting on `conn` (at most n), without taking them. The first call waits
    until the socket is readable; after a `partial` header, the next look comes 10 ms
    later (the socket stays readable, so waiting for readiness would spin)."""
    loop = asyncio.get_running_loop()
    if partial:
        await asyncio.sleep(0.01)
    else:
        ready: asyncio.Future[None] = loop.create_future()
        fd = conn.fileno()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, wake)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
    return conn.recv(n, socket.MSG_PEEK)


def _recv_exactly(conn: socket.socket, n: int) -> None:
    """Take the header off the socket: it was peeked, so all of it is there."""
    got = 0
    while got < n:
        chunk = conn.recv(n - got)
        if not chunk:
            raise ValueError("closed inside its PROXY header")
        got += len(chunk)


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
