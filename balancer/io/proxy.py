"""The data path: asyncio Protocols for client and backend connections.

One `ClientConnection` per accepted socket parses requests with httptools and
hands each `Exchange` to a pooled `UpstreamConnection`. Bodies stream both ways
with transport-level flow control, so memory per connection stays bounded.
Deadlines are plain floats checked by one sweeper (see `Sweeper`), which keeps
timer objects off the per-request path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import httptools

from balancer.config import Config
from balancer.http1.head import (
    BadRequest,
    ForwardOptions,
    Framing,
    RequestHead,
    downstream_response,
    error_response,
    inspect_request,
    rewrite_response_head,
    split_head,
    upstream_request,
)
from balancer.lb.cluster import Backend, Cluster

log = logging.getLogger("balancer.proxy")

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
PENDING_HIGH = 256 * 1024  # buffered request body before we stop reading the client
MAX_PIPELINE = 16

# deadline kinds of a client connection
D_NONE, D_HEAD, D_IDLE, D_BODY, D_TUNNEL, D_LINGER = range(6)
LINGER = 2.0  # seconds we drain a refused client's input before closing


class ProxyStats:
    __slots__ = (
        "bad_requests",
        "connections_open",
        "connections_total",
        "overload_rejections",
        "requests_total",
        "timeouts",
        "tls_handshakes",
    )

    def __init__(self) -> None:
        self.connections_total = 0
        self.connections_open = 0
        self.tls_handshakes = 0
        self.requests_total = 0
        self.bad_requests = 0
        self.overload_rejections = 0
        self.timeouts = 0


class ProxyContext:
    """Everything the connections of one listener share."""

    def __init__(
        self,
        cfg: Config,
        cluster: Cluster,
        *,
        proto: bytes = b"http",
        upstream_ssl: ssl.SSLContext | None = None,
        upstream_server_name: str | None = None,
        access_log: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.timeouts = cfg.timeouts
        self.limits = cfg.limits
        self.fwd = ForwardOptions(proto=proto, forwarded=cfg.forwarded, tls_facts=cfg.tls_facts)
        self.resp_extra = b""
        if proto == b"https" and cfg.tls.hsts:
            self.resp_extra = b"Strict-Transport-Security: " + cfg.tls.hsts.encode() + b"\r\n"
        self.upstream_ssl = upstream_ssl
        self.upstream_server_name = upstream_server_name
        self.access_log = access_log
        self.clients: set[ClientConnection] = set()
        self.stats = ProxyStats()
        self.draining = False
        self.attempts = cfg.retries.attempts
        kind, _, name = cfg.hash_key.partition(":")
        self.hash_kind = kind
        self.hash_name = name.lower().encode()
        self.waiting = 0  # exchanges queued for a backend connection slot
        self.loop = asyncio.get_running_loop()
        # a coarse clock, ticked by the sweeper: deadlines need no syscall per request
        self.now = self.loop.time()
        self.dirty: list[Sender] = []  # connections whose writes wait for `flush`

    def flush(self) -> None:
        dirty = self.dirty
        self.dirty = []
        for sender in dirty:
            sender.flush()

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg
        self.timeouts = cfg.timeouts
        self.limits = cfg.limits
        self.attempts = cfg.retries.attempts
        self.fwd = ForwardOptions(
            proto=self.fwd.proto, forwarded=cfg.forwarded, tls_facts=cfg.tls_facts
        )
        kind, _, name = cfg.hash_key.partition(":")
        self.hash_kind = kind
        self.hash_name = name.lower().encode()


class Exchange:
    """One request/response through the balancer."""

    __slots__ = (
        "attempts",
        "backend",
        "body_done",
        "body_sent",
        "bytes_in",
        "bytes_out",
        "chunked_out",
        "conn",
        "counted",
        "dead",
        "deadline",
        "framing",
        "head_request",
        "keep_alive",
        "pending",
        "pending_size",
        "req",
        "response_started",
        "started",
        "status",
        "tried",
        "tunnel_buf",
        "upstream",
        "wait_since",
    )

    def __init__(self, conn: ClientConnection, req: RequestHead, keep_alive: bool) -> None:
        self.conn = conn
        self.req = req
        self.keep_alive = keep_alive and not req.upgrade
        self.head_request = req.method == b"HEAD"
        self.backend: Backend | None = None
        self.upstream: UpstreamConnection | None = None
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.body_done = req.framing is Framing.NONE
        self.body_sent = False  # some body bytes went to a backend: not replayable
        self.tried: tuple[str, ...] = ()
        self.attempts = 0
        self.started = 0.0
        self.deadline = 0.0
        self.response_started = False
        self.status = 0
        self.chunked_out = False
        self.framing = Framing.NONE
        self.bytes_in = 0
        self.bytes_out = 0
        self.dead = False
        self.counted = False  # holds one of backend.in_flight
        self.wait_since = 0.0
        self.tunnel_buf: list[bytes] = []


def _hash_key(ctx: ProxyContext, conn: ClientConnection, req: RequestHead) -> bytes | None:
    kind = ctx.hash_kind
    if kind == "source":
        return conn.client_ip
    name = ctx.hash_name
    if kind == "header":
        for n, v in req.headers:
            if n.lower() == name:
                return v
        return None
    for n, v in req.headers:  # cookie
        if n.lower() == b"cookie":
            for part in v.split(b";"):
                k, _, val = part.strip().partition(b"=")
                if k.lower() == name:
                    return val
    return None


class Sender(asyncio.Protocol):
    """A connection whose writes wait until the loop has handled its current batch of events.

    Each write to a local peer that sleeps in epoll wakes it (a cross-CPU interrupt). Sending
    at once, between the reads of one poll, wakes nginx or the client once per request;
    sending after the batch wakes it about once per batch, as HAProxy does. That costs one
    loop iteration of latency; in `make bench` it took a request from ~85 to ~45 us of CPU.
    """

    ctx: ProxyContext
    transport: asyncio.Transport | None
    closed: bool
    out: list[bytes] | None

    def _send(self, data: bytes) -> None:
        out = self.out
        if out is not None:
            out.append(data)
            return
        self.out = [data]
        ctx = self.ctx
        if not ctx.dirty:
            ctx.loop.call_soon(ctx.flush)
        ctx.dirty.append(self)

    def flush(self) -> None:
        """Write what is waiting now; a close or half-close calls this first."""
        out = self.out
        if out is None:
            return
        self.out = None
        t = self.transport
        if t is not None and not self.closed:
            t.write(out[0] if len(out) == 1 else b"".join(out))


class ClientConnection(Sender):
    """A client's connection: parse requests, run exchanges in order, relay responses."""

    def __init__(self, ctx: ProxyContext, loop: asyncio.AbstractEventLoop) -> None:
        self.ctx = ctx
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = b"unknown"
        self.tls: tuple[str, str] | None = None
        self.queue: deque[Exchange] = deque()
        self.current: Exchange | None = None
        self.reading: Exchange | None = None  # the exchange whose body is being parsed
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.header_bytes = 0
        self.in_head = False
        self.closed = False
        self.broken: tuple[int, str] | None = None
        self.lingering = False
        self.paused = False
        self.tunnel: UpstreamConnection | None = None
        self.upgrade_wait = False
        self.deadline = 0.0
        self.dkind = D_NONE
        self.out: list[bytes] | None = None

    # asyncio callbacks ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        _nodelay(transport)
        ctx = self.ctx
        stats = ctx.stats
        stats.connections_total += 1
        stats.connections_open += 1
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip = peer[0].encode()
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is not None:
            stats.tls_handshakes += 1
            cipher = sslobj.cipher()
            self.tls = (sslobj.version() or "", cipher[0] if cipher else "")
        ctx.clients.add(self)
        if len(ctx.clients) > ctx.limits.max_client_connections or ctx.draining:
            stats.overload_rejections += 1
            self._send(error_response(503, "too many connections", extra=b"Retry-After: 1\r\n"))
            self._close()
            return
        self._set_deadline(D_IDLE, ctx.timeouts.idle_keepalive)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        ctx = self.ctx
        ctx.stats.connections_open -= 1
        ctx.clients.discard(self)
        if self.tunnel is not None:
            self.tunnel.close()
            self.tunnel = None
        ex = self.current
        if ex is not None:
            self._abandon(ex)
        for queued in self.queue:
            queued.dead = True
        self.queue.clear()

    def pause_writing(self) -> None:
        # the client reads slower than the backend sends: stop reading the backend
        ex = self.current
        up = self.tunnel or (ex.upstream if ex is not None else None)
        if up is not None and up.transport is not None:
            up.transport.pause_reading()
            up.paused_by_client = True

    def resume_writing(self) -> None:
        ex = self.current
        up = self.tunnel or (ex.upstream if ex is not None else None)
        if up is not None and up.transport is not None and up.paused_by_client:
            up.paused_by_client = False
            up.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # answered and half-closed: drop what the client still sends
        if self.tunnel is not None:
            self.tunnel._send(data)
            self.deadline = self.ctx.now + self.ctx.timeouts.tunnel_idle
            return
        if self.upgrade_wait:
            ex = self.current or (self.queue[-1] if self.queue else None)
            if ex is not None:
                ex.tunnel_buf.append(data)
                if sum(map(len, ex.tunnel_buf)) > PENDING_HIGH:
                    self._pause()
            return
        if self.broken is not None:
            return
        if self.in_head:
            self.head_bytes += len(data)
            lim = self.ctx.limits
            if self.head_bytes > lim.max_request_line + lim.max_header_bytes + 4096:
                self._bad(431, "request head too large")
                return
        elif self.dkind == D_IDLE and self.current is None:
            self.dkind = D_NONE
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.upgrade_wait = True
            offset = exc.args[0] if exc.args else len(data)
            rest = data[offset:]
            if rest and self.queue:
                self.queue[-1].tunnel_buf.append(rest)
            elif rest and self.current is not None:
                self.current.tunnel_buf.append(rest)
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, BadRequest):
                self._bad(cause.status, cause.reason)
            else:
                self._bad(400, str(exc) or "malformed request")
            return
        if self.current is None and self.queue:
            self._next()

    # httptools request callbacks ---------------------------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.head_bytes = 0
        self.header_bytes = 0
        self.in_head = True
        if self.dkind != D_HEAD:
            ctx = self.ctx
            self.dkind = D_HEAD
            self.deadline = ctx.now + ctx.timeouts.client_header

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.ctx.limits.max_request_line:
            raise BadRequest(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self.headers
        headers.append((name, value))
        lim = self.ctx.limits
        if len(headers) > lim.max_headers:
            raise BadRequest(431, "too many header fields")
        # counted here, not from packet sizes: a head that arrives in one packet counts too
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > lim.max_header_bytes:
            raise BadRequest(431, "header fields too large")

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self.parser
        lim = self.ctx.limits
        req = inspect_request(
            parser.get_method(), self.url, parser.get_http_version(), self.headers
        )
        if lim.max_request_body and req.content_length > lim.max_request_body:
            raise BadRequest(413, "request body too large")
        ex = Exchange(self, req, parser.should_keep_alive() and not self.ctx.draining)
        self.queue.append(ex)
        self.reading = ex
        self.ctx.stats.requests_total += 1
        if not ex.body_done:
            self._set_deadline(D_BODY, self.ctx.timeouts.client_body)
        else:
            self.dkind = D_NONE
        if len(self.queue) > MAX_PIPELINE:
            self._pause()

    def on_body(self, body: bytes) -> None:
        ex = self.reading
        if ex is None:
            return
        ex.bytes_in += len(body)
        if self.dkind == D_BODY:
            self.deadline = self.ctx.now + self.ctx.timeouts.client_body
        if ex.req.framing is Framing.CHUNKED:
            body = b"%x\r\n%b\r\n" % (len(body), body)
        up = ex.upstream
        if up is not None and up.transport is not None and not ex.pending:
            ex.body_sent = True
            up._send(body)
        else:
            ex.pending.append(body)
            ex.pending_size += len(body)
            if ex.pending_size > PENDING_HIGH:
                self._pause()

    def on_message_complete(self) -> None:
        ex = self.reading
        if ex is None:
            return
        self.reading = None
        if self.dkind == D_BODY:
            self.dkind = D_NONE
        if ex.req.framing is Framing.CHUNKED:
            up = ex.upstream
            if up is not None and up.transport is not None and not ex.pending:
                up._send(b"0\r\n\r\n")
            else:
                ex.pending.append(b"0\r\n\r\n")
        ex.body_done = True

    # exchange life cycle ---------------------------------------------------------------
    def _next(self) -> None:
        ex = self.queue.popleft()
        self.current = ex
        ex.started = self.loop.time()
        if self.paused and len(self.queue) <= MAX_PIPELINE // 2:
            self._resume()
        self.ctx.cluster.unbudgeted += 1  # reported to the retry budget in batches
        self._attempt(ex)

    def _attempt(self, ex: Exchange) -> None:
        ctx = self.ctx
        key = _hash_key(ctx, self, ex.req) if ctx.hash_kind != "source" else self.client_ip
        backend = ctx.cluster.pick(key, ex.tried)
        if backend is None:
            if ex.tried:
                # no other backend to retry on: report the last attempt's failure
                if ex.status == 504:
                    self._respond_error(ex, 504, "backend did not answer in time")
                else:
                    self._respond_error(ex, 502, "no backend could answer")
            else:
                self._respond_error(ex, 503, "no backend available", retry_after=True)
            return
        ex.backend = backend
        ex.tried += (backend.id,)
        ex.attempts += 1
        ex.counted = True
        backend.in_flight += 1
        backend.requests += 1
        idle = backend.idle
        if idle:
            idle.pop().attach(ex)
        elif backend.conn_count < ctx.limits.backend_max_connections:
            backend.conn_count += 1
            self.loop.create_task(_connect(ctx, backend, ex))
        elif ctx.waiting < ctx.limits.queue_size:
            ctx.waiting += 1
            ex.wait_since = self.loop.time()
            backend.waiters.append(ex)
        else:
            _uncount(ex)
            ctx.stats.overload_rejections += 1
            self._respond_error(ex, 503, "backend queue full", retry_after=True)

    def upstream_failed(self, ex: Exchange, kind: str, reached: bool) -> None:
        """The backend failed before or during the response."""
        backend = ex.backend
        ex.upstream = None
        _uncount(ex)
        if backend is not None:
            if kind == "connect":
                backend.errors_connect += 1
            else:
                backend.errors_response += 1
            self.ctx.cluster.failure(backend, kind)
        if ex.dead or self.closed:
            return
        if ex.response_started:
            # never pass on a truncated body as complete
            self._abort()
            return
        ctx = self.ctx
        ex.status = 504 if kind == "timeout" else 502  # the answer if no retry succeeds
        replayable = not ex.body_sent and (not reached or ex.req.method in IDEMPOTENT)
        if replayable and ex.attempts < ctx.attempts and ctx.cluster.try_retry(self.loop.time()):
            if backend is not None:
                backend.retries += 1
            self._attempt(ex)
            return
        if kind == "timeout":
            self._respond_error(ex, 504, "backend did not answer in time")
        else:
            self._respond_error(ex, 502, f"backend {kind} failure")

    def finish(self, ex: Exchange) -> None:
        """The response is complete on the client side."""
        if ex.chunked_out:
            self._send(b"0\r\n\r\n")
        now = self.loop.time()
        backend = ex.backend
        if backend is not None:
            if ex.counted:
                ex.counted = False
                backend.in_flight -= 1
            backend.bytes_in += ex.bytes_in
            backend.bytes_out += ex.bytes_out
            backend.observe(ex.status, now - ex.started)
            if ex.status >= 500:
                self.ctx.cluster.failure(backend, "5xx")
            elif backend.suspect:
                self.ctx.cluster.success(backend)
        if self.ctx.access_log is not None:
            self._log(ex, now)
        self._end(ex)

    def _end(self, ex: Exchange) -> None:
        self.current = None
        if self.closed:
            return
        if not ex.body_done:
            self._linger()  # the client may still be sending the body
            return
        if not ex.keep_alive or self.ctx.draining:
            self._close()
            return
        if self.broken is not None and not self.queue:
            status, reason = self.broken
            self._send(error_response(status, reason))
            self._linger()
            return
        if self.paused:
            self._resume()
        if self.queue:
            self._next()
        elif not self.in_head and self.reading is None:
            ctx = self.ctx
            self.dkind = D_IDLE
            self.deadline = ctx.now + ctx.timeouts.idle_keepalive

    def _respond_error(
        self, ex: Exchange, status: int, detail: str, *, retry_after: bool = False
    ) -> None:
        ex.status = status
        extra = b"Retry-After: 1\r\n" if retry_after else b""
        # the connection stays usable only if the request was read to its end
        close = not ex.keep_alive or not ex.body_done
        self._send(error_response(status, detail, close=close, extra=extra))
        self._log(ex, self.loop.time())
        self._end(ex)

    def _abandon(self, ex: Exchange) -> None:
        """The client went away: free what the exchange holds."""
        ex.dead = True
        up = ex.upstream
        if up is not None:
            ex.upstream = None
            up.ex = None
            up.close()
        _uncount(ex)
        self.current = None

    def _bad(self, status: int, reason: str) -> None:
        """Malformed input: answer the complete requests parsed before it, then close."""
        self.ctx.stats.bad_requests += 1
        self._pause()
        reading = self.reading
        if reading is not None and reading in self.queue:
            self.queue.remove(reading)
        self.reading = None
        self.broken = (status, reason)
        cur = self.current
        if cur is None and self.queue:
            self._next()  # `_end` sends the error once the queue is answered
        elif cur is None:
            self._send(error_response(status, reason))
            self._linger()
        elif cur is reading:
            # its body was malformed: the backend got a partial request
            up = cur.upstream
            if up is not None:
                up.ex = None
                up.close()
                cur.upstream = None
            _uncount(cur)
            if cur.response_started:
                self._abort()
            else:
                cur.keep_alive = False
                self._respond_error(cur, status, reason)

    def start_tunnel(self, up: UpstreamConnection, ex: Exchange) -> None:
        self.tunnel = up
        self.upgrade_wait = False
        buf = ex.tunnel_buf
        if buf:
            up._send(b"".join(buf))
            buf.clear()
        _uncount(ex)
        if ex.backend is not None:
            ex.backend.observe(101, self.loop.time() - ex.started)
        self._log(ex, self.loop.time())
        self.current = None
        self._set_deadline(D_TUNNEL, self.ctx.timeouts.tunnel_idle)
        if self.paused:
            self._resume()

    # helpers ---------------------------------------------------------------------------
    def _set_deadline(self, kind: int, seconds: float) -> None:
        self.dkind = kind
        self.deadline = self.ctx.now + seconds

    def _pause(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.flush()
            self.closed = True
            self.transport.close()

    def _linger(self) -> None:
        """Close after an early answer without a RST: send FIN, then drain and drop what the
        client still sends for a moment. Closing with unread input makes the kernel send a
        RST, which can destroy the answer in the client's receive buffer (a 413 mid-upload)."""
        t = self.transport
        if t is None or self.closed:
            return
        self.flush()
        if self.lingering or not t.can_write_eof():
            self._close()
            return
        self.lingering = True
        t.write_eof()
        if self.paused:
            self.paused = False
            t.resume_reading()
        self._set_deadline(D_LINGER, LINGER)

    def _abort(self) -> None:
        self.out = None
        if self.transport is not None:
            self.closed = True
            self.transport.abort()

    def _log(self, ex: Exchange, now: float) -> None:
        sink = self.ctx.access_log
        if sink is None:
            return
        req = ex.req
        sink(
            json.dumps(
                {
                    "ts": time.time(),
                    "client": self.client_ip.decode(),
                    "method": req.method.decode("latin-1"),
                    "path": req.target.decode("latin-1"),
                    "status": ex.status,
                    "backend": ex.backend.id if ex.backend is not None else None,
                    "duration_ms": round((now - ex.started) * 1000, 3),
                    "bytes_in": ex.bytes_in,
                    "bytes_out": ex.bytes_out,
                    "retries": max(0, ex.attempts - 1),
                    "request_id": req.request_id.decode("latin-1") or None,
                }
            )
        )

    def sweep(self, now: float) -> None:
        """Called by the sweeper: enforce client-side and exchange deadlines."""
        if self.closed:
            return
        ex = self.current
        if ex is not None and ex.upstream is not None and not ex.response_started:
            if ex.deadline and now >= ex.deadline:
                self.ctx.stats.timeouts += 1
                up = ex.upstream
                up.ex = None
                up.close()
                self.upstream_failed(ex, "timeout", reached=True)
                return
        kind = self.dkind
        if kind == D_NONE or now < self.deadline:
            return
        if kind == D_LINGER:
            self._close()
            return
        self.ctx.stats.timeouts += 1
        if kind in (D_IDLE, D_TUNNEL):
            self._close()
        elif self.current is None or not self.current.response_started:
            if self.current is not None:
                self._abandon(self.current)
            self._send(error_response(408, "request not received in time"))
            self._close()
        else:
            self._abort()


class UpstreamConnection(Sender):
    """A pooled connection to one backend; carries one exchange at a time."""

    def __init__(self, ctx: ProxyContext, backend: Backend) -> None:
        self.ctx = ctx
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.ex: Exchange | None = None
        self.hbuf: bytes | None = None  # raw bytes of a response head still being parsed
        self.interim = False
        self.reset_parser = False
        self.closed = False
        self.idle_since = 0.0
        self.paused_by_client = False
        self.is_tunnel = False
        self.peer: ClientConnection | None = None  # the client, once this is a tunnel
        self.upgrade_head = b""
        self.out: list[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        _nodelay(transport)

    def attach(self, ex: Exchange) -> None:
        """Send the exchange's request head and any buffered body."""
        self.ex = ex
        ex.upstream = self
        self.hbuf = b""
        conn = ex.conn
        ctx = self.ctx
        head = upstream_request(ex.req, conn.client_ip, ctx.fwd, conn.tls)
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
        if not self.closed and self.transport is not None:
            self.flush()  # a tunnel's last bytes, e.g. a WebSocket close frame
            self.closed = True
            self.transport.close()

    def pause_writing(self) -> None:
        ex = self.ex
        conn = ex.conn if ex is not None else self.peer
        if conn is not None:
            conn._pause()

    def resume_writing(self) -> None:
        ex = self.ex
        conn = ex.conn if ex is not None else self.peer
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
            self.close()
            return
        if self.hbuf is not None:
            self.hbuf += data
        conn = ex.conn
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args else len(data)
            self._upgrade(ex, data[offset:])
            return
        except httptools.HttpParserError:
            self.ex = None
            self.close()
            conn.upstream_failed(ex, "protocol", reached=True)
            return
        if self.reset_parser:
            self.reset_parser = False
            self.parser = httptools.HttpResponseParser(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        backend = self.backend
        backend.conn_count -= 1
        try:
            backend.idle.remove(self)
        except ValueError:
            pass
        ex = self.ex
        self.ex = None
        if self.is_tunnel:
            peer = self.peer
            if peer is not None:
                peer.tunnel = None
                peer._close()
        elif ex is not None and not ex.dead:
            if ex.response_started and ex.framing is Framing.UNTIL_CLOSE:
                ex.upstream = None
                ex.conn.finish(ex)
            else:
                ex.conn.upstream_failed(ex, "reset", reached=True)
        _serve_waiter(self.ctx, backend)

    # httptools response callbacks (no per-header ones: the raw head is rewritten) --------
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
                ex.conn._send(raw + b"\r\n")
            return
        if status == 101:
            self.upgrade_head = self._take_head()
            return  # handled by _upgrade once the parser raises HttpParserUpgrade
        buf = self.hbuf or b""
        self.hbuf = None
        raw = buf[: buf.find(b"\r\n\r\n") + 2]
        conn = ex.conn
        head, framing, chunked = rewrite_response_head(
            raw,
            status,
            ex.head_request,
            client_chunked_ok=ex.req.version != "1.0",
            keep_alive=ex.keep_alive and not self.ctx.draining,  # `_end` sends any error after
            extra=self.ctx.resp_extra,
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

    def on_body(self, body: bytes) -> None:
        ex = self.ex
        if ex is None:
            return
        ex.bytes_out += len(body)
        if ex.chunked_out:
            body = b"%x\r\n%b\r\n" % (len(body), body)
        ex.conn._send(body)

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
        ex.upstream = None
        if keep and ex.body_done and not ex.req.upgrade and not self.closed:
            backend = self.backend
            ctx = self.ctx
            if (
                not backend.waiters
                and len(backend.idle) < ctx.limits.backend_max_idle
                and backend.admin_state != "maint"
            ):
                self.idle_since = ctx.now  # the common case of _release, inline
                backend.idle.append(self)
            else:
                _release(ctx, self)
        else:
            self.close()
        ex.conn.finish(ex)

    def _upgrade(self, ex: Exchange, rest: bytes) -> None:
        conn = ex.conn
        ex.status = 101
        ex.response_started = True
        reason, headers = split_head(self.upgrade_head)
        head, _, _ = downstream_response(
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
        ex.upstream = None
        self.is_tunnel = True
        self.peer = conn
        conn.start_tunnel(self, ex)


def _release(ctx: ProxyContext, up: UpstreamConnection) -> None:
    """Return a connection to its backend's idle pool, or hand it to a waiting exchange."""
    backend = up.backend
    while backend.waiters:
        ex = backend.waiters.popleft()
        ctx.waiting -= 1
        if not ex.dead:
            ex.wait_since = 0.0
            up.attach(ex)
            return
    if len(backend.idle) >= ctx.limits.backend_max_idle or backend.admin_state == "maint":
        up.close()
        return
    up.idle_since = ctx.now
    backend.idle.append(up)


def rescue_in_flight(ctx: ProxyContext, backend: Backend) -> int:
    """The backend was declared down: retry elsewhere what it has not begun to answer.

    Without this, requests stuck on a hung backend wait for the backend-response
    timeout. Only exchanges that are replayable (no body sent, or the method is
    idempotent, as for any retry) are moved; the others get their 502/504 now.
    """
    moved = 0
    for conn in list(ctx.clients):
        ex = conn.current
        if ex is None or ex.backend is not backend or ex.response_started:
            continue
        up = ex.upstream
        if up is None:
            continue
        up.ex = None
        up.close()
        conn.upstream_failed(ex, "timeout", reached=True)
        moved += 1
    return moved


def _nodelay(transport: asyncio.BaseTransport) -> None:
    # head and body leave in separate writes; Nagle + delayed ACK would stall them 40 ms
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _uncount(ex: Exchange) -> None:
    if ex.counted:
        ex.counted = False
        if ex.backend is not None:
            ex.backend.in_flight -= 1


def _serve_waiter(ctx: ProxyContext, backend: Backend) -> None:
    """A connection slot freed up: open a new connection for the first waiter."""
    while backend.waiters and backend.conn_count < ctx.limits.backend_max_connections:
        ex = backend.waiters.popleft()
        ctx.waiting -= 1
        if ex.dead:
            continue
        ex.wait_since = 0.0
        backend.conn_count += 1
        ctx.loop.create_task(_connect(ctx, backend, ex))
        return


async def _connect(ctx: ProxyContext, backend: Backend, ex: Exchange) -> None:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(ctx.timeouts.connect):
            _, up = await loop.create_connection(
                lambda: UpstreamConnection(ctx, backend),
                backend.host,
                backend.port,
                ssl=ctx.upstream_ssl,
                server_hostname=(ctx.upstream_server_name or backend.host)
                if ctx.upstream_ssl is not None
                else None,
            )
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        backend.conn_count -= 1
        kind = "timeout" if isinstance(exc, TimeoutError) else "connect"
        if not ex.dead:
            ex.conn.upstream_failed(ex, kind, reached=False)
        else:
            _uncount(ex)
        _serve_waiter(ctx, backend)
        return
    if ex.dead or ex.conn.closed:
        _release(ctx, up)
        return
    up.attach(ex)


class Sweeper:
    """One periodic task enforces every deadline, instead of a timer per request."""

    def __init__(self, ctxs: list[ProxyContext], cluster: Cluster, period: float = 0.25) -> None:
        self.ctxs = ctxs
        self.cluster = cluster
        self.period = period
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.period)
            for ctx in self.ctxs:
                ctx.now = loop.time()
            try:
                self.sweep(loop.time())
            except Exception:  # a bug here must not stop deadline enforcement
                log.exception("sweeper failed")

    def sweep(self, now: float) -> None:
        self.cluster.flush_budget(now)
        for ctx in self.ctxs:
            ctx.now = now
            for conn in list(ctx.clients):
                conn.sweep(now)
        ctx0 = self.ctxs[0] if self.ctxs else None
        if ctx0 is None:
            return
        idle_limit = now - ctx0.timeouts.backend_idle
        queue_limit = now - ctx0.timeouts.queue
        for backend in list(self.cluster.backends.values()):
            idle = backend.idle
            while idle and idle[0].idle_since < idle_limit:
                idle.popleft().close()
            waiters = backend.waiters
            while waiters and (waiters[0].dead or waiters[0].wait_since < queue_limit):
                ex = waiters.popleft()
                ctx0.waiting -= 1
                if ex.dead:
                    continue
                _uncount(ex)
                ex.wait_since = 0.0
                ex.conn.ctx.stats.overload_rejections += 1
                ex.conn._respond_error(ex, 503, "timed out waiting for a backend", retry_after=True)


def access_log_sink(target: str | None) -> Callable[[str], None] | None:
    """`-` for stdout, a path to append to, None for no access log."""
    if target is None:
        return None
    if target == "-":
        import sys

        out: Any = sys.stdout
    else:
        out = open(target, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def sink(line: str) -> None:
        out.write(line + "\n")

    return sink
