"""One request/response through the balancer, and the listener state its connections share.

No I/O here: `ListenerContext` gets its clock and its write batch from the driver.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from balancer.config import Config
from balancer.http1.head import ForwardOptions, Framing, RequestHead
from balancer.http1.output import Batch
from balancer.lb.cluster import Backend, Cluster

if TYPE_CHECKING:
    from balancer.http1.backend import BackendSide
    from balancer.http1.client import ClientSide
    from balancer.http1.pool import ConnectionPool

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
PENDING_HIGH = 256 * 1024  # buffered request body before we stop reading the client
MAX_PIPELINE = 16


class ListenerStats:
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


class ListenerContext:
    """Everything the client connections of one listener share."""

    def __init__(
        self,
        cfg: Config,
        cluster: Cluster,
        pool: ConnectionPool,
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
        self.clients: set[ClientSide] = set()
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

    def __init__(self, conn: ClientSide, req: RequestHead, keep_alive: bool) -> None:
        self.client = conn
        self.req = req
        self.keep_alive = keep_alive and not req.upgrade
        self.head_request = req.method == b"HEAD"
        self.backend: Backend | None = None
        self.backend_conn: BackendSide | None = None  # the connection carrying it
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
