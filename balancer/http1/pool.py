"""The connection pool: the one owner of connections to backends.

It keeps idle connections for reuse, counts open ones against the per-backend limit,
queues exchanges that wait for a slot, expires idle connections and queued exchanges,
and is the only code that closes a backend connection. Opening one is the driver's job:
`open` starts a connect and later reports `connected` or `connect_failed`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from balancer.config import Limits, Timeouts
from balancer.lb.cluster import Backend


class PooledConn(Protocol):
    """What the pool needs of a backend connection."""

    backend: Backend
    closed: bool
    idle_since: float

    def close(self) -> None: ...


class Waiter(Protocol):
    """What the pool needs of an exchange that wants a connection."""

    dead: bool

    def abandoned(self) -> bool: ...
    def connect_failed(self, kind: str) -> None: ...
    def queue_timeout(self) -> None: ...


C = TypeVar("C", bound=PooledConn)
W = TypeVar("W", bound=Waiter)


class Slots(Generic[C, W]):
    """One backend's share of the pool."""

    __slots__ = ("count", "idle", "waiters")

    def __init__(self) -> None:
        self.count = 0  # open connections: idle + busy + connecting
        self.idle: deque[C] = deque()
        self.waiters: deque[tuple[float, W]] = deque()  # (queued at, exchange)


class ConnectionPool(Generic[C, W]):
    """`open(backend, ex)` starts a connect; `attach(conn, ex)` puts an exchange on a
    connection (the protocol's business: the pool only decides which and when)."""

    def __init__(
        self,
        limits: Limits,
        timeouts: Timeouts,
        clock: Callable[[], float],
        open: Callable[[Backend, W], None],
        attach: Callable[[C, W], None],
    ) -> None:
        self.limits = limits
        self.timeouts = timeouts
        self.clock = clock
        self.open = open
        self.attach = attach
        self.slots: dict[str, Slots[C, W]] = {}
        self.waiting = 0  # exchanges queued for a slot, all backends

    def reconfigure(self, limits: Limits, timeouts: Timeouts) -> None:
        self.limits = limits
        self.timeouts = timeouts

    def slots_of(self, backend_id: str) -> Slots[C, W]:
        s = self.slots.get(backend_id)
        if s is None:
            s = self.slots[backend_id] = Slots[C, W]()
        return s

    # the hot path -------------------------------------------------------------------------
    def checkout(self, backend: Backend, ex: W) -> bool:
        """Give `ex` a connection to `backend`: now, once connected, or once one frees up.

        False when the backend's connections and the queue are all taken."""
        s = self.slots.get(backend.id) or self.slots_of(backend.id)
        if s.idle:
            self.attach(s.idle.pop(), ex)
            return True
        limits = self.limits
        if s.count < limits.backend_max_connections:
            s.count += 1
            self.open(backend, ex)
            return True
        if self.waiting < limits.queue_size:
            self.waiting += 1
            s.waiters.append((self.clock(), ex))
            return True
        return False

    def checkin(self, conn: C, now: float) -> None:
        """`conn` finished an exchange and can carry another: a waiter's, or stay idle."""
        if conn.closed:
            return  # `lost` does the accounting
        s = self.slots.get(conn.backend.id) or self.slots_of(conn.backend.id)
        while s.waiters:
            _, ex = s.waiters.popleft()
            self.waiting -= 1
            if not ex.dead:
                self.attach(conn, ex)
                return
        if len(s.idle) >= self.limits.backend_max_idle or conn.backend.admin_state == "maint":
            self.discard(conn)
            return
        conn.idle_since = now
        s.idle.append(conn)

    # connection life cycle (the driver reports) ------------------------------------------
    def connected(self, conn: C, ex: W) -> None:
        if ex.abandoned():
            self.checkin(conn, self.clock())
        else:
            self.attach(conn, ex)

    def connect_failed(self, backend: Backend, ex: W, kind: str) -> None:
        self.slots_of(backend.id).count -= 1
        ex.connect_failed(kind)
        self._serve_waiter(backend)

    def lost(self, conn: C) -> None:
        """The connection closed, by either side."""
        s = self.slots_of(conn.backend.id)
        s.count -= 1
        try:
            s.idle.remove(conn)
        except ValueError:
            pass
        self._serve_waiter(conn.backend)

    def discard(self, conn: C) -> None:
        """Close a connection that must not be reused; `lost` follows from the driver."""
        conn.close()

    def _serve_waiter(self, backend: Backend) -> None:
        """A slot freed up: open a new connection for the first live waiter."""
        s = self.slots.get(backend.id)
        if s is None:
            return
        while s.waiters and s.count < self.limits.backend_max_connections:
            _, ex = s.waiters.popleft()
            self.waiting -= 1
            if ex.dead:
                continue
            s.count += 1
            self.open(backend, ex)
            return

    # housekeeping -------------------------------------------------------------------------
    def expire(self, now: float) -> None:
        """Close idle connections past `backend_idle` and refuse exchanges queued too long."""
        idle_limit = now - self.timeouts.backend_idle
        queue_limit = now - self.timeouts.queue
        for s in list(self.slots.values()):
            idle = s.idle
            while idle and idle[0].idle_since < idle_limit:
                self.discard(idle.popleft())
            waiters = s.waiters
            while waiters and (waiters[0][1].dead or waiters[0][0] < queue_limit):
                _, ex = waiters.popleft()
                self.waiting -= 1
                if not ex.dead:
                    ex.queue_timeout()

    def close_idle(self, backend_id: str | None = None) -> None:
        """Close the idle connections of one backend (removed) or of all (stopping)."""
        for bid, s in list(self.slots.items()):
            if backend_id is None or bid == backend_id:
                while s.idle:
                    self.discard(s.idle.pop())

    def counts(self, backend_id: str) -> tuple[int, int]:
        """(open connections, idle connections) of one backend, for the views."""
        s = self.slots.get(backend_id)
        return (s.count, len(s.idle)) if s is not None else (0, 0)
