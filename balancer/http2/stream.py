"""One HTTP/2 stream: one exchange, seen by the backend side and the pool as its client.

A `Stream` is the `ClientPort` of its exchange (`balancer.http1.exchange`): the HTTP/1.1
`BackendSide` sends it the response head (`response_head`), body bytes (`_send`), 1xx
(`interim`) and the end (`finish`); the pool reports connect failures and queue timeouts
through the exchange. Scheduling, retries, outlier detection and the access log follow
`balancer.http1.client.ClientSide` rule for rule; what differs is only the framing:
- A failure after the response started resets this stream (INTERNAL_ERROR), never the
  connection: the other streams carry on.
- Flow control both ways, bounded: request DATA is acknowledged (WINDOW_UPDATE) only once
  the backend took it, so a slow backend stalls the client's window; response bytes wait in
  `out` for the client's window, and above OUT_HIGH the backend connection stops being read.
No I/O, no h2 calls: the connection (`balancer.http2.client.H2ClientSide`) does the framing.
"""

from __future__ import annotations

from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING, Protocol

from balancer.http1.exchange import (
    IDEMPOTENT,
    PENDING_HIGH,
    BackendPort,
    Exchange,
    count_failure,
)
from balancer.http1.head import Framing
from balancer.http2.request import (
    NOT_RESPONSE_TRAILERS,
    error_headers,
    interim_headers,
    response_headers,
)

if TYPE_CHECKING:
    from balancer.http1.exchange import ListenerContext


class StreamOwner(Protocol):
    """What a stream asks of its connection (`balancer.http2.client.H2ClientSide`): a
    Protocol, so the two modules do not import each other."""

    ctx: ListenerContext
    client_ip: bytes
    tls: tuple[str, str] | None
    resp_extra: list[tuple[bytes, bytes]]

    def want(self, s: Stream) -> None: ...
    def ack(self, sid: int, n: int) -> None: ...
    def send_interim(self, s: Stream, headers: list[tuple[bytes, bytes]]) -> None: ...
    def reset(self, s: Stream, code: int) -> None: ...
    def forget(self, s: Stream) -> None: ...
    def unsent(self) -> int: ...


OUT_HIGH = 128 * 1024  # response bytes held for one stream before the backend is paused
OUT_LOW = 32 * 1024

_NO_QUEUE: deque[Exchange] = deque()  # a stream carries one exchange: nothing ever queues


class Stream:
    h2 = True

    __slots__ = (
        "client_ip",
        "closed",
        "ctx",
        "current",
        "deadline",
        "done",
        "ended",
        "ex",
        "head",
        "out",
        "out_size",
        "paused",
        "paused_backend",
        "progress",
        "sid",
        "side",
        "tls",
        "trailers",
        "trailers_size",
        "withheld",
    )

    tunnel: BackendPort | None = None
    queue = _NO_QUEUE

    def __init__(self, side: StreamOwner, sid: int) -> None:
        self.side = side
        self.sid = sid
        self.ctx = side.ctx
        self.client_ip = side.client_ip
        self.tls = side.tls
        self.closed = False  # reset, or the connection is gone
        self.paused = False  # request DATA is not being acknowledged
        self.withheld = 0  # flow-controlled bytes received but not acknowledged yet
        self.current: Exchange | None = None
        self.ex: Exchange | None = None
        self.deadline = 0.0
        self.head: list[tuple[bytes, bytes]] | None = None  # response head not framed yet
        self.out: deque[bytes] = deque()  # response body waiting for the client's window
        self.out_size = 0
        self.trailers: list[tuple[bytes, bytes]] = []  # the response's, sent after the body
        self.trailers_size = 0
        self.done = False  # the response is complete on our side
        self.ended = False  # END_STREAM (or RST_STREAM) went out
        self.paused_backend = False
        self.progress = 0.0  # last time response bytes moved (zero-window stall)

    # request side (from the connection) ---------------------------------------------------
    def on_data(self, data: bytes, flow: int) -> None:
        ex = self.ex
        if ex is None or ex.dead or self.done:
            self.side.ack(self.sid, flow)
            return
        ex.bytes_in += len(data)
        if data and ex.req.framing is Framing.CHUNKED:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if data:
            up = ex.backend_conn
            if up is not None and not ex.pending:
                ex.body_sent = True
                up._send(data)
            else:
                ex.pending.append(data)
                ex.pending_size += len(data)
                if ex.pending_size > PENDING_HIGH:
                    self.paused = True
        if self.paused:
            self.withheld += flow
        else:
            self.side.ack(self.sid, flow)

    def on_end(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        ex = self.ex
        if ex is None or ex.body_done:
            return
        if ex.req.framing is Framing.CHUNKED:
            tail = b"0\r\n"
            for name, value in trailers or ():
                tail += name + b": " + value + b"\r\n"
            tail += b"\r\n"
            up = ex.backend_conn
            if up is not None and not ex.pending:
                up._send(tail)
            else:
                ex.pending.append(tail)
        ex.body_done = True

    def reset_by_client(self) -> None:
        """RST_STREAM from the client: free what the exchange holds."""
        self.ended = True
        self._drop()

    def _drop(self) -> None:
        self.closed = True
        ex = self.ex
        if ex is not None and not ex.dead:
            ex.dead = True
            up = ex.backend_conn
            if up is not None:
                up.detach()
            ex.uncount()
        self.current = None
        self.out.clear()
        self.out_size = 0
        self.side.forget(self)

    # what the backend side calls (ClientPort) --------------------------------------------
    def interim(self, status: int, raw: bytes) -> None:
        self.side.send_interim(self, interim_headers(status, raw))

    def response_head(self, ex: Exchange, status: int, raw: bytes) -> None:
        head, length, chunked = response_headers(status, raw, self.side.resp_extra)
        if ex.head_request or status in (204, 304):
            framing = Framing.NONE
        elif chunked:
            framing = Framing.CHUNKED
        elif length > 0:
            framing = Framing.LENGTH
        elif length == 0:
            framing = Framing.NONE
        else:
            framing = Framing.UNTIL_CLOSE  # ends when the backend closes
        ex.response_started = True
        ex.status = status
        ex.framing = framing
        self.head = head
        self.progress = self.ctx.now
        self.side.want(self)

    def trailer(self, name: bytes, value: bytes) -> None:
        """A trailer field of a chunked response (the backend's parser reports them)."""
        name = name.lower()
        if name in NOT_RESPONSE_TRAILERS:
            return
        size = self.trailers_size + len(name) + len(value) + 32  # as HPACK counts
        if size > self.ctx.limits.max_header_bytes:
            # the body is whole without them: drop them all rather than send a part
            self.trailers_size = size
            self.trailers.clear()
            return
        self.trailers_size = size
        self.trailers.append((name, value.strip(b" \t")))

    def _send(self, data: bytes) -> None:
        if self.closed:
            return
        self.out.append(data)
        self.out_size += len(data)
        self.side.want(self)
        if self.out_size > OUT_HIGH and not self.paused_backend:
            ex = self.ex
            up = ex.backend_conn if ex is not None else None
            if up is not None and not up.closed:
                self.paused_backend = True
                up._pause_reading()
                up.paused_by_client = True

    def drained(self) -> None:
        """The connection took response bytes from `out` (its flush calls this)."""
        self.progress = self.ctx.now
        if self.paused_backend and self.out_size < OUT_LOW:
            self.paused_backend = False
            ex = self.ex
            up = ex.backend_conn if ex is not None else None
            if up is not None and not up.closed and up.paused_by_client:
                up.paused_by_client = False
                up._resume_reading()

    def _pause(self) -> None:
        # the backend cannot take more request body: stop opening the client's window
        self.paused = True

    def _resume(self) -> None:
        if self.paused:
            self.paused = False
            n, self.withheld = self.withheld, 0
            self.side.ack(self.sid, n)

    def _close(self) -> None:
        self.side.reset(self, 0x8)  # CANCEL

    def _abort(self) -> None:
        self.side.reset(self, 0x2)  # INTERNAL_ERROR

    def unsent(self) -> int:
        return self.out_size + self.side.unsent()

    def start_tunnel(self, up: BackendPort, ex: Exchange) -> None:
        # never asked for (an HTTP/2 request carries no Upgrade): the backend misbehaved
        self.ctx.pool.discard(up)
        self.backend_failed(ex, "protocol", reached=True)

    def finish(self, ex: Exchange) -> None:
        """The response is complete on our side (END_STREAM follows the last byte)."""
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
        self._log(ex, now)
        self.current = None
        self.done = True
        self.side.want(self)

    def backend_failed(self, ex: Exchange, kind: str, reached: bool) -> None:
        """As `ClientSide.backend_failed`; after the response started only this stream
        is reset."""
        ctx = self.ctx
        backend = count_failure(ex, ctx.cluster, kind)
        if ex.dead or self.closed:
            return
        if ex.response_started:
            self._log(ex, ctx.clock())
            self._abort()
            return
        ex.status = 504 if kind == "timeout" else 502
        replayable = not ex.body_sent and (not reached or ex.req.method in IDEMPOTENT)
        if replayable and ex.attempts < ctx.attempts and ctx.cluster.try_retry(ctx.clock()):
            if backend is not None:
                backend.retries += 1
            self.attempt(ex)
            return
        if kind == "timeout":
            self.respond_error(ex, 504, "backend did not answer in time")
        else:
            self.respond_error(ex, 502, f"backend {kind} failure")

    def queue_timeout(self, ex: Exchange) -> None:
        self.ctx.stats.overload_rejections += 1
        self.respond_error(ex, 503, "timed out waiting for a backend")

    def in_flight(self) -> list[Exchange]:
        return [self.current] if self.current is not None else []

    def sweep(self, now: float) -> None:
        ex = self.ex
        if ex is None or self.closed:
            return
        if ex.backend_conn is not None and not ex.response_started:
            if ex.deadline and now >= ex.deadline:
                self.ctx.stats.timeouts += 1
                ex.backend_conn.detach()
                self.backend_failed(ex, "timeout", reached=True)
                return
        # HTTP/2's slowloris: response bytes wait and the client never opens its window
        if self.out and now - self.progress > self.ctx.timeouts.client_body:
            self.ctx.stats.timeouts += 1
            self.side.reset(self, 0x8)  # CANCEL

    # scheduling (as ClientSide._attempt) --------------------------------------------------
    def start(self, ex: Exchange) -> None:
        self.ex = self.current = ex
        ctx = self.ctx
        ex.started = ctx.clock()
        ctx.cluster.unbudgeted += 1
        self.attempt(ex)

    def attempt(self, ex: Exchange) -> None:
        ctx = self.ctx
        key = ctx.hash_key(self.client_ip, ex.req) if ctx.hash_kind != "source" else self.client_ip
        backend = ctx.cluster.pick(key, ex.tried)
        if backend is None:
            if ex.tried:
                if ex.status == 504:
                    self.respond_error(ex, 504, "backend did not answer in time")
                else:
                    self.respond_error(ex, 502, "no backend could answer")
            else:
                self.respond_error(ex, 503, "no backend available")
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
            self.respond_error(ex, 503, "backend queue full")

    def respond_error(self, ex: Exchange, status: int, detail: str) -> None:
        ex.status = status
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
        body = f"{status} {phrase}: {detail}\n".encode()
        head = error_headers(status, len(body))
        if status == 503:
            head.append((b"retry-after", b"1"))
        ex.response_started = True
        self.head = head
        self.out.append(body)
        self.out_size += len(body)
        self._log(ex, self.ctx.clock())
        self.current = None
        self.done = True
        self.side.want(self)

    def _log(self, ex: Exchange, now: float) -> None:
        sink = self.ctx.access_log
        if sink is not None:
            sink(ex.log_line(now, self.ctx.wallclock()))
