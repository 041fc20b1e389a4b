"""One request/response through the balancer, and the listener state its connections share.

No I/O here: `ListenerContext` gets its clock and its write batch from the driver.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from balancer.config import Config
from balancer.http1.head import ForwardOptions, Framing, RequestHead
from balancer.http1.output import Batch
from balancer.http1.pool import ConnectionPool
from balancer.lab.table import ConnTable
from balancer.lb.cluster import Backend, Cluster

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
PENDING_HIGH = 256 * 1024  # buffered request body before we stop reading the client
MAX_PIPELINE = 16


class BackendPort(Protocol):
    """What the client side and the pool need of a backend connection (`BackendSide`)."""

    backend: Backend
    closed: bool
    idle_since: float
    paused_by_client: bool

    def attach(self, ex: Exchange) -> None: ...
    def close(self) -> None: ...
    def detach(self) -> None: ...
    def _send(self, data: bytes) -> None: ...
    def _pause_reading(self) -> None: ...
    def _resume_reading(self) -> None: ...


class ClientPort(Protocol):
    """What the backend side, the pool and the listener need of a client connection
    (`ClientSide`)."""

    ctx: ListenerContext
    h2: bool  # an HTTP/2 stream (a `StreamPort`): the response head goes as fields
    client_ip: bytes
    tls: tuple[str, str] | None
    closed: bool
    paused: bool
    queue: deque[Exchange]
    current: Exchange | None
    tunnel: BackendPort | None
    deadline: float

    def _send(self, data: bytes) -> None: ...
    def _pause(self) -> None: ...
    def _resume(self) -> None: ...
    def _close(self) -> None: ...
    def _abort(self) -> None: ...
    def unsent(self) -> int: ...
    def finish(self, ex: Exchange) -> None: ...
    def backend_failed(self, ex: Exchange, kind: str, reached: bool) -> None: ...
    def queue_timeout(self, ex: Exchange) -> None: ...
    def start_tunnel(self, up: BackendPort, ex: Exchange) -> None: ...
    def in_flight(self) -> list[Exchange]: ...  # exchanges waiting on a backend
    def sweep(self, now: float) -> None: ...


class StreamPort(ClientPort, Protocol):
    """The client of an exchange that arrived on an HTTP/2 stream (`balancer.http2`): the
    backend side hands it the response head instead of sending rewritten HTTP/1.1 bytes."""

    def response_head(self, ex: Exchange, status: int, raw: bytes) -> None: ...
    def interim(self, status: int, raw: bytes) -> None: ...
    def trailer(self, name: bytes, value: bytes) -> None: ...


Pool = ConnectionPool[BackendPort, "Exchange"]


def count_failure(ex: Exchange, cluster: Cluster, kind: str) -> Backend | None:
    """A failed attempt (HTTP/1.1 or an HTTP/2 stream): the exchange lets go of its backend
    connection, and the backend's error counters and outlier detection hear of it."""
    backend = ex.backend
    ex.backend_conn = None
    ex.uncount()
    if backend is not None:
        if kind == "connect":
            backend.errors_connect += 1
        else:
            backend.errors_response += 1
        cluster.failure(backend, kind)
    return backend


def attach(conn: BackendPort, ex: Exchange) -> None:
    """The pool's `attach`: send the exchange's request on the connection."""
    conn.attach(ex)


class ListenerStats:
    __slots__ = (
        "bad_requests",
        "connections_open",
        "connections_total",
        "h2_connections_open",
        "h2_connections_total",
        "h2_streams_open",
        "h2_streams_total",
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
        # HTTP/2's share (connections and requests above count both protocols)
        self.h2_connections_total = 0
        self.h2_connections_open = 0
        self.h2_streams_total = 0
        self.h2_streams_open = 0


class ListenerContext:
    """Everything the client connections of one listener share."""

    def __init__(
        self,
        cfg: Config,
        cluster: Cluster,
        pool: Pool,
        *,
        clock: Callable[[], float],
        batch: Batch,
        proto: bytes = b"http",
        access_log: Callable[[str], None] | None = None,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        self.cluster = cluster
        self.pool = pool
        self.clock = clock
        self.batch = batch
        self.proto = proto
        self.access_log = access_log
        self.wallclock = wallclock  # access-log timestamps
        self.clients: set[ClientPort] = set()
        self.conns = ConnTable(clock)  # the network lab's records, client and backend side
        self.stats = ListenerStats()
        self.draining = False
        # a coarse clock, ticked by the sweeper: deadlines need no syscall per request
        self.now = clock()
        self.reconfigure(cfg)

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg
        self.timeouts = cfg.timeouts
        self.limits = cfg.limits
        self.attempts = cfg.retries.attempts
        self.fwd = ForwardOptions(
            proto=self.proto, forwarded=cfg.forwarded, tls_facts=cfg.tls_facts
        )
        self.resp_extra = b""
        if self.proto == b"https" and cfg.tls.hsts:
            self.resp_extra = b"Strict-Transport-Security: " + cfg.tls.hsts.encode() + b"\r\n"
        kind, _, name = cfg.hash_key.partition(":")
        self.hash_kind = kind
        self.hash_name = name.lower().encode()

    def hash_key(self, client_ip: bytes, req: RequestHead) -> bytes | None:
        """The key source hashing uses for this request (`hash_key` in the settings)."""
        kind = self.hash_kind
        if kind == "source":
            return client_ip
        name = self.hash_name
        if kind == "sni":  # a TCP-mode key; an HTTP listener spreads such requests
            return None
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

    def sweep(self, now: float) -> None:
        """Enforce the deadlines of every client connection (the sweeper calls this)."""
        self.now = now
        for conn in list(self.clients):
            conn.sweep(now)


class Exchange:
    """One request/response: what was asked, where it went, and how far it got."""

    __slots__ = (
        "attempts",
        "backend",
        "backend_conn",
        "body_done",
        "body_sent",
        "bytes_in",
        "bytes_out",
        "chunked_out",
        "client",
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
    )

    def __init__(self, conn: ClientPort, req: RequestHead, keep_alive: bool) -> None:
        self.client = conn
        self.req = req
        self.keep_alive = keep_alive and not req.upgrade
        self.head_request = req.method == b"HEAD"
        self.backend: Backend | None = None
        self.backend_conn: BackendPort | None = None  # the connection carrying it
        self.pending: list[bytes] = []  # request body not yet sent to a backend
        self.pending_size = 0
        self.body_done = req.framing is Framing.NONE
        self.body_sent = False  # some body bytes went to a backend: not replayable
        self.tried: tuple[str, ...] = ()
        self.attempts = 0
        self.started = 0.0
        self.deadline = 0.0  # for the response head
        self.response_started = False
        self.status = 0
        self.chunked_out = False
        self.framing = Framing.NONE
        self.bytes_in = 0
        self.bytes_out = 0
        self.dead = False  # the client went away
        self.counted = False  # holds one of backend.in_flight
        self.tunnel_buf: list[bytes] = []

    def uncount(self) -> None:
        if self.counted:
            self.counted = False
            if self.backend is not None:
                self.backend.in_flight -= 1

    # what the pool reports (`balancer.http1.pool.Waiter`) ---------------------------------
    def abandoned(self) -> bool:
        return self.dead or self.client.closed

    def connect_failed(self, kind: str) -> None:
        if self.dead:
            self.uncount()
        else:
            self.client.backend_failed(self, kind, reached=False)

    def queue_timeout(self) -> None:
        self.uncount()
        self.client.queue_timeout(self)

    def log_line(self, now: float, ts: float) -> str:
        """The exchange's access-log line (JSON)."""
        req = self.req
        return json.dumps(
            {
                "ts": ts,
                "client": self.client.client_ip.decode(),
                "method": req.method.decode("latin-1"),
                "path": req.target.decode("latin-1"),
                "status": self.status,
                "backend": self.backend.id if self.backend is not None else None,
                "backend_address": self.backend.address if self.backend is not None else None,
                "duration_ms": round((now - self.started) * 1000, 3),
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "retries": max(0, self.attempts - 1),
                "request_id": req.request_id.decode("latin-1") or None,
                "protocol": "HTTP/2" if self.client.h2 else "HTTP/" + req.version,
            }
        )
