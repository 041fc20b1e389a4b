"""In-flight requests per backend per worker, in shared memory, for least connections.

One int64 slot per (worker, backend slot); each worker writes only its own row, every
worker reads all rows. No lock: a read sees another worker's count as of its last write
(an aligned 8-byte store, never torn on x86-64/arm64), so a pick is at most one
request-start or -end per other worker behind, the time a store takes to become visible.
The supervisor creates the table and hands out backend slots.
"""

from __future__ import annotations

import math
import mmap
import os
import random
from collections.abc import Callable, Sequence
from typing import ClassVar

from balancer.config import BackendSpec
from balancer.lb.algorithms import Algorithm, LeastConnections, T, make_algorithm
from balancer.lb.cluster import Backend
from balancer.lb.health import RetryBudget, SlowStart

MAX_SLOTS = 256  # backends with a shared count; more are counted per worker only
BUDGET_BUCKETS = 16  # the retry budget's one-second buckets (its window rounded up, <= 16)
# a worker's row: in-flight counts by backend slot, then (second, requests, retries) per
# retry-budget bucket
ROW = MAX_SLOTS + 3 * BUDGET_BUCKETS


class InFlightTable:
    """`workers` rows of ROW int64 counters in an anonymous shared file (memfd).

    The supervisor creates it and passes the descriptor to each worker (`fd`); nothing is
    named, so nothing can be left behind: the kernel frees it with the last descriptor.
    """

    def __init__(self, workers: int, fd: int | None = None) -> None:
        size = workers * ROW * 8
        if fd is None:
            fd = os.memfd_create("lb-in-flight", os.MFD_CLOEXEC)  # workers get it by pass_fds
            os.ftruncate(fd, size)  # zero-filled
        self.fd = fd
        self.map = mmap.mmap(fd, size)
        self.workers = workers
        self.cells = memoryview(self.map).cast("q")

    def clear_row(self, worker: int) -> None:
        """A restarted worker starts from zero (its predecessor's requests died with it)."""
        base = worker * ROW
        for i in range(base, base + ROW):
            self.cells[i] = 0

    def total(self, slot: int) -> int:
        cells = self.cells
        return sum(cells[w * ROW + slot] for w in range(self.workers))

    def close(self) -> None:
        self.cells.release()
        self.map.close()
        os.close(self.fd)


class SharedBackend(Backend):
    """A worker's Backend whose in-flight count is also written to its row of the table."""

    __slots__ = ("_local", "_row_base", "_table", "slot")

    def __init__(
        self,
        spec: BackendSpec,
        clock: Callable[[], float],
        slow_start: SlowStart | None,
        table: InFlightTable,
        worker: int,
    ) -> None:
        self._local = 0
        self.slot = -1
        self._table = table
        self._row_base = worker * ROW
        super().__init__(spec, clock, slow_start)

    @property  # type: ignore[override]
    def in_flight(self) -> int:
        return self._local

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        self._local = value
        if self.slot >= 0:
            self._table.cells[self._row_base + self.slot] = value

    def place(self, slot: int) -> None:
        """Take the supervisor's slot for this backend; publish the count so far."""
        self.slot = slot
        self.in_flight = self._local

    def total_in_flight(self) -> int:
        """In-flight requests of every worker (this one's own count is exact)."""
        if self.slot < 0:
            return self._local
        return self._table.total(self.slot)


class SharedRetryBudget(RetryBudget):
    """A worker's retry budget over the requests and retries of every worker.

    Each worker mirrors its one-second buckets into its row; `try_retry` sums the buckets
    of all rows that fall in the window. Like the in-flight counts, another worker's
    bucket is read as of its last store (a bucket being reset may be read half-written for
    an instant: a retry more or less, never a runaway).
    """

    def __init__(
        self, table: InFlightTable, worker: int, ratio: float, min_per_second: float
    ) -> None:
        super().__init__(ratio=ratio, min_per_second=min_per_second)
        if self._n > BUDGET_BUCKETS:
            raise ValueError(f"retry budget window over {BUDGET_BUCKETS} s")
        self._table = table
        self._base = worker * ROW + MAX_SLOTS

    def _publish(self, i: int) -> None:
        cells, at = self._table.cells, self._base + 3 * i
        cells[at] = self._second[i]
        cells[at + 1] = self._requests[i]
        cells[at + 2] = self._retries[i]

    def on_request(self, now: float) -> None:
        super().on_request(now)
        self._publish(self._bucket(now))

    def on_requests(self, now: float, count: int) -> None:
        super().on_requests(now, count)
        self._publish(self._bucket(now))

    def try_retry(self, now: float) -> bool:
        allowed = super().try_retry(now)
        if allowed:
            self._publish(self._bucket(now))
        return allowed

    def _totals(self, now: float) -> tuple[int, int]:
        sec = math.floor(now)
        oldest = sec - self._n
        cells = self._table.cells
        requests = retries = 0
        for w in range(self._table.workers):
            base = w * ROW + MAX_SLOTS
            for i in range(self._n):
                at = base + 3 * i
                if oldest < cells[at] <= sec:
                    requests += cells[at + 1]
                    retries += cells[at + 2]
        return requests, retries


class SharedLeastConnections(LeastConnections):
    """LeastConnections scoring by the in-flight requests of all workers."""

    name: ClassVar[str] = "least-connections"

    def pick(self, targets: Sequence[T], key: bytes | None = None) -> T | None:
        rand = self._rng.random
        best: T | None = None
        best_score = math.inf
        ties = 0
        for t in targets:
            total = t.total_in_flight() if isinstance(t, SharedBackend) else t.in_flight
            score = (total + 1) / t.weight
            if best is None or score < best_score:
                best = t
                best_score = score
                ties = 1
            elif score == best_score:
                ties += 1
                if rand() * ties < 1.0:
                    best = t
        return best


def worker_algorithm(name: str, rng: random.Random) -> Algorithm:
    """make_algorithm, with least connections counting every worker's requests."""
    if name == SharedLeastConnections.name:
        return SharedLeastConnections(rng)
    return make_algorithm(name, rng)
