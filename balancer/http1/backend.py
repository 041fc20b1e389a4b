"""The backend side of the HTTP/1.1 exchange: one pooled connection to one backend.

A `BackendSide` carries one exchange at a time. It sends the rebuilt request head and the
body, parses the response with httptools, rewrites its head for the client and relays the
body, and at the end hands itself back to the pool. On a 101 it becomes one half of a
byte tunnel. For an HTTP/2 stream the parser also reports fields, so a chunked response's
trailers reach the stream (an HTTP/1.1 client's parser has no per-field callback: they
cost it nothing, and are dropped as before). No I/O: the driver (`balancer.io.backend`)
supplies the transport operations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import httptools

from balancer.http1.exchange import (
    MAX_PIPELINE,
    ClientPort,
    Exchange,
    ListenerContext,
    StreamPort,
)
from balancer.http1.head import (
    Framing,
    backend_request,
    client_response,
    rewrite_response_head,
    split_head,
)
from balancer.http1.output import Output
from balancer.lb.cluster import Backend


class BackendSide(Output):
    # httptools reads this once, when a parser is made: set only while serving HTTP/2
    on_header: Callable[[bytes, bytes], None]

    def __init__(self, ctx: ListenerContext, backend: Backend) -> None:
        self.ctx = ctx
        self.batch = ctx.batch
        self.backend = backend
        self.parser = httptools.HttpResponseParser(self)
        self.ex: Exchange | None = None
        self.hbuf: bytes | None = None  # raw bytes of a response head still being parsed
        self.interim = False
        self.reset_parser = False
        self.closed = False
        self.idle_since = 0.0
        self.paused_by_client = False
        self.is_tunnel = False
        self.peer: ClientPort | None = None  # the client, once this is a tunnel
        self.upgrade_head = b""
        self.out: list[bytes] | None = None
        self.for_h2 = False  # the parser reports fields (trailers) for HTTP/2 streams

    def attach(self, ex: Exchange) -> None:
        """Send the exchange's request head and any buffered body."""
        self.ex = ex
        ex.backend_conn = self
        self.hbuf = b""
        conn = ex.client
        if conn.h2 is not self.for_h2:  # between messages: a new parser loses nothing
            self.for_h2 = conn.h2
            if conn.h2:
                self.on_header = self._trailer_field
            else:
                del self.on_header
            self.parser = httptools.HttpResponseParser(self)
        ctx = conn.ctx
        head = backend_request(ex.req, conn.client_ip, ctx.fwd, conn.tls)
        if ex.pending:
            ex.body_sent = True
            head += b"".join(ex.pending)
            ex.pending.clear()
            ex.pending_size = 0
            if conn.paused and len(conn.queue) <= MAX_PIPELINE // 2:
                conn._resume()
        ex.deadline = ctx.now + ctx.timeouts.backend_response
        self._send(head)

    def close(self) -> None:
        """Only the pool calls this (`ConnectionPool.discard`)."""
        if not self.closed:
            self.flush()  # a tunnel's last bytes, e.g. a WebSocket close frame
            self.closed = True
            self._close_transport()

    def detach(self) -> None:
        """The exchange no longer wants this connection, mid-way: it cannot be reused."""
        ex = self.ex
        if ex is not None:
            ex.backend_conn = None
        self.ex = None
        self.ctx.pool.discard(self)

    # events from the driver ---------------------------------------------------------------
    def pause_writing(self) -> None:
        ex = self.ex
        conn = ex.client if ex is not None else self.peer
        if conn is not None:
            conn._pause()

    def resume_writing(self) -> None:
        ex = self.ex
        conn = ex.client if ex is not None else self.peer
        if conn is not None:
            conn._resume()

    def data_received(self, data: bytes) -> None:
        if self.is_tunnel:
            peer = self.peer
            if peer is not None:
                peer._send(data)
                peer.deadline = self.ctx.now + self.ctx.timeouts.tunnel_idle
            return
        ex = self.ex
        if ex is None:
            # a response nobody asked for: the connection is unusable
            self.ctx.pool.discard(self)
            return
        if self.hbuf is not None:
            self.hbuf += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            self._upgrade(ex, data[offset:])
            return
        except httptools.HttpParserError:
            self.detach()
            ex.client.backend_failed(ex, "protocol", reached=True)
            return
        if self.reset_parser:
            self.reset_parser = False
            self.parser = httptools.HttpResponseParser(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ctx.pool.lost(self)
        ex = self.ex
        self.ex = None
        if self.is_tunnel:
            peer = self.peer
            if peer is not None:
                peer.tunnel = None
                peer._close()
        elif ex is not None and not ex.dead:
            if ex.response_started and ex.framing is Framing.UNTIL_CLOSE:
                ex.backend_conn = None
                ex.client.finish(ex)
            else:
                ex.client.backend_failed(ex, "reset", reached=True)

    # httptools response callbacks (no per-header ones: the raw head is rewritten) ---------
    def _take_head(self) -> bytes:
        buf = self.hbuf or b""
        end = buf.find(b"\r\n\r\n")
        self.hbuf = buf[end + 4 :]
        return buf[: end + 2]

    def on_headers_complete(self) -> None:
        ex = self.ex
        assert ex is not None
        status = self.parser.get_status_code()
        if status < 200 and status != 101:
            self.interim = True
            raw = self._take_head()
            if ex.req.version != "1.0" and status in (100, 103):
                if ex.client.h2:
                    cast(StreamPort, ex.client).interim(status, raw)
                else:
                    ex.client._send(raw + b"\r\n")
            return
        if status == 101:
            self.upgrade_head = self._take_head()
            return  # handled by _upgrade once the parser raises HttpParserUpgrade
        buf = self.hbuf or b""
        self.hbuf = None
        raw = buf[: buf.find(b"\r\n\r\n") + 2]
        conn = ex.client
        if conn.h2:
            cast(StreamPort, conn).response_head(ex, status, raw)
            if ex.head_request:
                self.reset_parser = True
                self._complete(ex, self.parser.should_keep_alive())
            return
        ctx = conn.ctx
        head, framing, chunked = rewrite_response_head(
            raw,
            status,
            ex.head_request,
            client_chunked_ok=ex.req.version != "1.0",
            keep_alive=ex.keep_alive and not ctx.draining,  # `_end` sends any error after
            extra=ctx.resp_extra,
        )
        if framing is Framing.UNTIL_CLOSE and not chunked:
            ex.keep_alive = False
        ex.response_started = True
        ex.status = status
        ex.chunked_out = chunked
        ex.framing = framing
        conn._send(head)
        if ex.head_request:
            # llhttp cannot be told the response to HEAD has no body: finish now
            self.reset_parser = True
            self._complete(ex, self.parser.should_keep_alive())

    def _trailer_field(self, name: bytes, value: bytes) -> None:
        # the head's fields come too (the raw head is used for those): only the fields
        # after the final head, i.e. a chunked body's trailers, are passed on
        ex = self.ex
        if ex is not None and ex.response_started:
            cast(StreamPort, ex.client).trailer(name, value)

    def on_body(self, body: bytes) -> None:
        ex = self.ex
        if ex is None:
            return
        ex.bytes_out += len(body)
        if ex.chunked_out:
            body = b"%x\r\n%b\r\n" % (len(body), body)
        ex.client._send(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        ex = self.ex
        if ex is None or self.upgrade_head:
            return  # a 101 "completes" too: `_upgrade` takes over when the parser raises
        self._complete(ex, self.parser.should_keep_alive())

    def _complete(self, ex: Exchange, keep: bool) -> None:
        self.ex = None
        ex.backend_conn = None
        ctx = self.ctx
        if keep and ex.body_done and not ex.req.upgrade:
            ctx.pool.checkin(self, ctx.now)
        else:
            ctx.pool.discard(self)
        ex.client.finish(ex)

    def _upgrade(self, ex: Exchange, rest: bytes) -> None:
        conn = ex.client
        if conn.h2:  # an HTTP/2 stream never asked for a 101
            self.detach()
            conn.backend_failed(ex, "protocol", reached=True)
            return
        ex.status = 101
        ex.response_started = True
        reason, headers = split_head(self.upgrade_head)
        head, _, _ = client_response(
            101,
            reason,
            headers,
            False,
            client_chunked_ok=True,
            keep_alive=True,
        )
        conn._send(head)
        if rest:
            conn._send(rest)
        self.ex = None
        ex.backend_conn = None
        self.is_tunnel = True
        self.peer = conn
        conn.start_tunnel(self, ex)
