"""Playbooks for the sans-I/O data path: drive ClientSide and BackendSide with no sockets.

A `Playbook` owns a cluster, a connection pool and one listener context with a fake clock.
Connections record the transport operations their core asks for; the test plays the
network's part: it feeds bytes, completes or refuses the connects the pool asks for,
delivers `connection_lost` after a close, and moves the clock.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace
from typing import Any

from balancer.config import BackendSpec, Config
from balancer.http1.backend import BackendSide
from balancer.http1.client import ClientSide
from balancer.http1.exchange import Exchange, ListenerContext, Pool, attach
from balancer.http1.output import Batch
from balancer.http1.pool import ConnectionPool
from balancer.io.sweeper import sweep
from balancer.lb.cluster import Backend, Cluster


class Recorder:
    """The transport operations of `Output`, recorded in order."""

    calls: list[tuple[str, bytes | None]]
    lost: bool

    def _write(self, data: bytes) -> None:
        assert not self.lost, "write after connection_lost"
        self.calls.append(("write", data))

    def _pause_reading(self) -> None:
        self.calls.append(("pause", None))

    def _resume_reading(self) -> None:
        self.calls.append(("resume", None))

    def _write_eof(self) -> bool:
        self.calls.append(("eof", None))
        return True

    def _close_transport(self) -> None:
        self.calls.append(("close", None))

    def _abort_transport(self) -> None:
        self.calls.append(("abort", None))

    def unsent(self) -> int:
        return 0

    def ops(self) -> list[str]:
        return [op for op, _ in self.calls]

    def written(self) -> bytes:
        return b"".join(data for op, data in self.calls if op == "write" and data)

    def ended(self) -> str | None:
        """'close' or 'abort' once the core asked for either."""
        for op, _ in self.calls:
            if op in ("close", "abort"):
                return op
        return None


class Client(Recorder, ClientSide):
    def __init__(self, ctx: ListenerContext) -> None:
        super().__init__(ctx)
        self.calls = []
        self.lost = False


class Conn(Recorder, BackendSide):
    def __init__(self, ctx: ListenerContext, backend: Backend) -> None:
        super().__init__(ctx, backend)
        self.calls = []
        self.lost = False


class Playbook:
    def __init__(self, backends: int = 2, **settings: Any) -> None:
        self.now = 1000.0
        specs = tuple(BackendSpec("127.0.0.1", 9001 + i) for i in range(backends))
        cfg = Config(listen="127.0.0.1:0", backends=specs)
        for section, values in settings.items():
            current = getattr(cfg, section)
            new = replace(current, **values) if isinstance(values, dict) else values
            cfg = replace(cfg, **{section: new})
        self.cfg = cfg
        self.cluster = Cluster(
            cfg.backends,
            cfg.algorithm,
            clock=self.clock,
            rng=random.Random(1),
            outlier=cfg.outlier,
            retries=cfg.retries,
        )
        self.opens: list[tuple[Backend, Exchange]] = []
        self.pool: Pool = ConnectionPool(
            cfg.limits, cfg.timeouts, self.clock, lambda b, ex: self.opens.append((b, ex)), attach
        )
        self.batch = Batch(lambda: None)
        self.log: list[str] = []
        self.ctx = self.listener()
        self.conns: list[Conn] = []
        self.clients: list[Client] = []

    def clock(self) -> float:
        return self.now

    def listener(self) -> ListenerContext:
        return ListenerContext(
            self.cfg,
            self.cluster,
            self.pool,
            clock=self.clock,
            batch=self.batch,
            access_log=self.log.append,
            wallclock=self.clock,
        )

    def backend(self, i: int) -> Backend:
        return self.cluster.backends[f"127.0.0.1:{9001 + i}"]

    # the network's part -------------------------------------------------------------------
    def client(self, ctx: ListenerContext | None = None, ip: bytes = b"127.0.0.9") -> Client:
        c = Client(ctx or self.ctx)
        c.opened(ip, None)
        self.clients.append(c)
        return c

    def connect(self) -> Conn:
        """Complete the oldest connect the pool asked for."""
        backend, ex = self.opens.pop(0)
        conn = Conn(ex.client.ctx, backend)
        self.conns.append(conn)
        self.pool.connected(conn, ex)
        self.settle()
        return conn

    def refuse(self, kind: str = "connect") -> Backend:
        backend, ex = self.opens.pop(0)
        self.pool.connect_failed(backend, ex, kind)
        self.settle()
        return backend

    def settle(self) -> None:
        """What the loop does after a batch of events: flush writes, deliver closes."""
        self.batch.flush()
        for c in (*self.clients, *self.conns):
            if c.ended() and not c.lost:
                c.lost = True
                c.connection_lost(None)
        self.batch.flush()

    def feed(self, side: ClientSide | BackendSide, data: bytes) -> None:
        side.data_received(data)
        self.settle()

    def advance(self, seconds: float) -> None:
        """Move the clock, then run one sweeper round."""
        self.now += seconds
        sweep(self.now, [self.ctx], self.cluster, self.pool)
        self.settle()

    # reading the result -------------------------------------------------------------------
    def access_log(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log]


def request_line(data: bytes) -> bytes:
    return data.split(b"\r\n", 1)[0]


def statuses(data: bytes) -> list[int]:
    """Status codes of the responses in a byte stream, in order (bodies must not look like
    status lines)."""
    return [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", data)]
