"""The client side of the HTTP/1.1 exchange: one accepted connection, many requests in order.

Rules, as h11 states its own at the top:
- Requests are parsed with httptools (llhttp, strict); `head.inspect_request` refuses what a
  proxy must not forward ambiguously. Pipelined requests queue (at most MAX_PIPELINE, then
  reading pauses) and are answered strictly in order, one exchange at a time.
- Each exchange is scheduled by the cluster's algorithm, gets a backend connection from the
  pool, and streams its body as it arrives; reading pauses above PENDING_HIGH buffered bytes.
- A failure before the response starts is retried on a different backend when the request
  is replayable (no body sent yet, or an idempotent method after the backend saw it), the
  attempts setting allows it and the retry budget has room; otherwise 502 (504 for a
  timeout). A failure after the response started aborts the client connection: a truncated
  body is never passed on as complete.
- Deadlines are plain floats checked by `sweep`: client header, client body, keep-alive
  idle, tunnel idle, the backend's response head, and a lingering close after an early
  answer. Errors are short bodies with the right status; a refusal before the request body
  was read closes with a lingering half-close, so a RST cannot wipe out the answer.
- A 101 turns the connection into a byte tunnel to that backend.

No I/O here: the driver (`balancer.io.client`) implements the transport operations of
`Output` and calls `opened`, `data_received`, `pause_writing`, `resume_writing` and
`connection_lost`; the playbook tests in tests/balancer/http1 do the same with no sockets.
"""

from __future__ import annotations

from collections import deque

import httptools

from balancer.http1.exchange import (
    IDEMPOTENT,
    MAX_PIPELINE,
    PENDING_HIGH,
    BackendPort,
    Exchange,
    ListenerContext,
    count_failure,
)
from balancer.http1.head import BadRequest, Framing, error_response, inspect_request
from balancer.http1.output import Output
from balancer.lb.cluster import Backend

# what the connection's one deadline is for
D_NONE, D_HEAD, D_IDLE, D_BODY, D_TUNNEL, D_LINGER = range(6)
LINGER = 2.0  # seconds we drain a refused client's input before closing


class ClientSide(Output):
    """A client's connection: parse requests, run exchanges in order, relay responses."""

    h2 = False

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        self.batch = ctx.batch
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = b"unknown"
        self.tls: tuple[str, str] | None = None  # (version, cipher)
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
        self.tunnel: BackendPort | None = None
        self.upgrade_wait = False
        self.deadline = 0.0
        self.dkind = D_NONE
        self.out: list[bytes] | None = None

    # events from the driver ---------------------------------------------------------------
    def opened(self, client_ip: bytes | None, tls: tuple[str, str] | None) -> None:
        """The connection is accepted (and its TLS handshake done)."""
        ctx = self.ctx
        stats = ctx.stats
        stats.connections_total += 1
        stats.connections_open += 1
        if client_ip:
            self.client_ip = client_ip
        if tls is not None:
            stats.tls_handshakes += 1
            self.tls = tls
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
            tunnel, self.tunnel = self.tunnel, None
            ctx.pool.discard(tunnel)
        ex = self.current
        if ex is not None:
            self._abandon(ex)
        for queued in self.queue:
            queued.dead = True
        self.queue.clear()

    def pause_writing(self) -> None:
        # the client reads slower than the backend sends: stop reading the backend
        ex = self.current
        up = self.tunnel or (ex.backend_conn if ex is not None else None)
        if up is not None and not up.closed:
            up._pause_reading()
            up.paused_by_client = True

    def resume_writing(self) -> None:
        ex = self.current
        up = self.tunnel or (ex.backend_conn if ex is not None else None)
        if up is not None and not up.closed and up.paused_by_client:
            up.paused_by_client = False
            up._resume_reading()

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
            elif data.startswith(b"PRI * HTTP/2.0"):
                self._bad(400, "HTTP/2 is not enabled on this listener")
            else:
                self._bad(400, "malformed request")
            return
        if self.current is None and self.queue:
            self._next()

    # httptools request callbacks ----------------------------------------------------------
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
        ctx = self.ctx
        req = inspect_request(
            parser.get_method(), self.url, parser.get_http_version(), self.headers
        )
        if ctx.limits.max_request_body and req.content_length > ctx.limits.max_request_body:
            raise BadRequest(413, "request body too large")
        ex = Exchange(self, req, parser.should_keep_alive() and not ctx.draining)
        self.queue.append(ex)
        self.reading = ex
        ctx.stats.requests_total += 1
        if not ex.body_done:
            self._set_deadline(D_BODY, ctx.timeouts.client_body)
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
        up = ex.backend_conn
        if up is not None and not ex.pending:
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
            up = ex.backend_conn
            if up is not None and not ex.pending:
                up._send(b"0\r\n\r\n")
            else:
                ex.pending.append(b"0\r\n\r\n")
        ex.body_done = True

    # exchange life cycle ------------------------------------------------------------------
    def _next(self) -> None:
        ex = self.queue.popleft()
        self.current = ex
        ctx = self.ctx
        ex.started = ctx.clock()
        if self.paused and len(self.queue) <= MAX_PIPELINE // 2:
            self._resume()
        ctx.cluster.unbudgeted += 1  # reported to the retry budget in batches
        self._attempt(ex)

    def _attempt(self, ex: Exchange) -> None:
        ctx = self.ctx
        key = ctx.hash_key(self.client_ip, ex.req) if ctx.hash_kind != "source" else self.client_ip
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
        if not ctx.pool.checkout(backend, ex):
            ex.uncount()
            ctx.stats.overload_rejections += 1
            self._respond_error(ex, 503, "backend queue full", retry_after=True)

    def backend_failed(self, ex: Exchange, kind: str, reached: bool) -> None:
        """The backend failed before or during the response (`kind`: connect, reset,
        timeout or protocol); `reached` says whether it may have seen the request."""
        ctx = self.ctx
        backend = count_failure(ex, ctx.cluster, kind)
        if ex.dead or self.closed:
            return
        if ex.response_started:
            # never pass on a truncated body as complete
            self._abort()
            return
        ex.status = 504 if kind == "timeout" else 502  # the answer if no retry succeeds
        replayable = not ex.body_sent and (not reached or ex.req.method in IDEMPOTENT)
        if replayable and ex.attempts < ctx.attempts and ctx.cluster.try_retry(ctx.clock()):
            if backend is not None:
                backend.retries += 1
            self._attempt(ex)
            return
        if kind == "timeout":
            self._respond_error(ex, 504, "backend did not answer in time")
        else:
            self._respond_error(ex, 502, f"backend {kind} failure")

    def queue_timeout(self, ex: Exchange) -> None:
        """The pool gave up waiting for a connection slot for `ex`."""
        self.ctx.stats.overload_rejections += 1
        self._respond_error(ex, 503, "timed out waiting for a backend", retry_after=True)

    def finish(self, ex: Exchange) -> None:
        """The response is complete on the client side."""
        if ex.chunked_out:
            self._send(b"0\r\n\r\n")
        ctx = self.ctx
        now = ctx.clock()
        backend = ex.backend
        if backend is not None:
            if ex.counted:
                ex.counted = False
                backend.in_flight -= 1
            backend.observe(ex.status, now - ex.started)
            if ex.status >= 500:
                ctx.cluster.failure(backend, "5xx")
            elif backend.suspect:
                ctx.cluster.success(backend)
        if ctx.access_log is not None:
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
        self._log(ex, self.ctx.clock())
        self._end(ex)

    def _drop_backend_conn(self, ex: Exchange) -> None:
        """The exchange gives up its backend connection mid-way: the pool closes it."""
        up = ex.backend_conn
        if up is not None:
            up.detach()

    def _abandon(self, ex: Exchange) -> None:
        """The client went away: free what the exchange holds."""
        ex.dead = True
        self._drop_backend_conn(ex)
        ex.uncount()
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
            self._drop_backend_conn(cur)
            cur.uncount()
            if cur.response_started:
                self._abort()
            else:
                cur.keep_alive = False
                self._respond_error(cur, status, reason)

    def start_tunnel(self, up: BackendPort, ex: Exchange) -> None:
        self.tunnel = up
        self.upgrade_wait = False
        buf = ex.tunnel_buf
        if buf:
            up._send(b"".join(buf))
            buf.clear()
        ex.uncount()
        now = self.ctx.clock()
        if ex.backend is not None:
            ex.backend.observe(101, now - ex.started)
        self._log(ex, now)
        self.current = None
        self._set_deadline(D_TUNNEL, self.ctx.timeouts.tunnel_idle)
        if self.paused:
            self._resume()

    def in_flight(self) -> list[Exchange]:
        return [self.current] if self.current is not None else []

    def sweep(self, now: float) -> None:
        """Enforce this connection's deadlines and its exchange's response deadline."""
        if self.closed:
            return
        ex = self.current
        if ex is not None and ex.backend_conn is not None and not ex.response_started:
            if ex.deadline and now >= ex.deadline:
                self.ctx.stats.timeouts += 1
                self._drop_backend_conn(ex)
                self.backend_failed(ex, "timeout", reached=True)
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

    # helpers ------------------------------------------------------------------------------
    def _set_deadline(self, kind: int, seconds: float) -> None:
        self.dkind = kind
        self.deadline = self.ctx.now + seconds

    def _pause(self) -> None:
        if not self.paused and not self.closed:
            self.paused = True
            self._pause_reading()

    def _resume(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            self._resume_reading()

    def _close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True
            self._close_transport()

    def _linger(self) -> None:
        """Close after an early answer without a RST: send FIN, then drain and drop what the
        client still sends for a moment. Closing with unread input makes the kernel send a
        RST, which can destroy the answer in the client's receive buffer (a 413 mid-upload)."""
        if self.closed:
            return
        self.flush()
        if self.lingering or not self._write_eof():
            self._close()
            return
        self.lingering = True
        if self.paused:
            self.paused = False
            self._resume_reading()
        self._set_deadline(D_LINGER, LINGER)

    def _abort(self) -> None:
        self.out = None
        if not self.closed:
            self.closed = True
            self._abort_transport()

    def _log(self, ex: Exchange, now: float) -> None:
        sink = self.ctx.access_log
        if sink is not None:
            sink(ex.log_line(now, self.ctx.wallclock()))


def rescue_in_flight(ctx: ListenerContext, backend: Backend) -> int:
    """The backend was declared down: retry elsewhere what it has not begun to answer.

    Without this, requests stuck on a hung backend wait for the backend-response
    timeout. Only exchanges that are replayable (no body sent, or the method is
    idempotent, as for any retry) are moved; the others get their 502/504 now.
    """
    moved = 0
    for conn in list(ctx.clients):
        for ex in conn.in_flight():  # an HTTP/2 connection has one per open stream
            if ex.backend is not backend or ex.response_started:
                continue
            up = ex.backend_conn
            if up is None:
                continue
            up.detach()
            ex.client.backend_failed(ex, "timeout", reached=True)
            moved += 1
    return moved
