"""The cluster: runtime backends, their counters and the choice of one per request.

Counters are plain ints bumped on the hot path; the metrics side reads them at
scrape time, so a request never pays for Prometheus objects.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Iterable
from typing import Protocol

from balancer.config import BackendSpec, OutlierSettings, RetrySettings
from balancer.events import EventKind
from balancer.lb.algorithms import Algorithm, make_algorithm
from balancer.lb.health import OutlierDetector, RetryBudget, SlowStart, eligible

# Latency buckets in seconds (upper bounds), shared by metrics and the dashboard.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Backend:
    """One backend server: admin state, check state, pooled connections and counters."""

    __slots__ = (
        "_weight",
        "address",
        "admin_state",
        "backup",
        "check_detail",
        "check_duration",
        "check_up",
        "clock",
        "discovered",
        "ejections",
        "errors_connect",
        "errors_response",
        "host",
        "id",
        "in_flight",
        "last_check",
        "latency",
        "latency_sum",
        "port",
        "requests",
        "responses",
        "retries",
        "slow_start",
        "suspect",
        "tcp_bytes_in",
        "tcp_bytes_out",
        "tcp_connections",
        "tcp_seconds",
        "up_since",
        "weight",
    )

    def __init__(
        self,
        spec: BackendSpec,
        clock: Callable[[], float],
        slow_start: SlowStart | None = None,
    ) -> None:
        # the one name users see (spec.name, else host:port); the address stays beside it
        self.id = spec.id
        self.address = spec.address
        self.clock = clock
        # effective weight, a plain attribute read by the scheduler on every pick; the cluster
        # re-derives it (slow start) whenever it recomputes the eligible set
        self.weight = spec.weight
        self.suspect = False  # has failures the outlier detector still counts
        self.host = spec.host
        self.port = spec.port
        self._weight = spec.weight
        self.backup = spec.backup
        self.admin_state = "enabled"  # enabled | draining | maint
        self.check_up = True
        self.check_detail = ""
        self.check_duration = 0.0
        self.last_check: bool | None = None
        self.up_since: float | None = None  # set on recovery, for slow start
        self.slow_start = slow_start
        self.discovered = False
        self.in_flight = 0
        self.requests = 0
        self.responses = [0, 0, 0, 0, 0, 0]  # index = status // 100
        self.errors_connect = 0
        self.errors_response = 0
        self.retries = 0
        self.ejections = 0
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0  # seconds, for the Prometheus histogram _sum
        # TCP mode: relayed connections, their bytes each way and their summed duration
        self.tcp_connections = 0
        self.tcp_bytes_in = 0
        self.tcp_bytes_out = 0
        self.tcp_seconds = 0.0

    def effective_weight(self, now: float) -> float:
        """The configured weight, with slow start applied."""
        if self.up_since is None or self.slow_start is None:
            return self._weight
        return self._weight * self.slow_start.factor(self.up_since, now)

    @property
    def configured_weight(self) -> float:
        return self._weight

    def set_weight(self, weight: float) -> None:
        self._weight = weight
        self.weight = self.effective_weight(self.clock())

    def observe(self, status: int, seconds: float) -> None:
        self.responses[status // 100 if 100 <= status < 600 else 0] += 1
        self.latency[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds


class Remote(Protocol):
    """Where a worker process's passive-check outcomes go and its ejections come from: the
    supervisor decides them once for all workers (balancer.workers)."""

    def failure(self, backend_id: str, kind: str) -> None: ...

    def success(self, backend_id: str) -> None: ...

    def ejected(self, backend_id: str) -> bool: ...


class Cluster:
    """All backends of the listener, the scheduler and passive-check state."""

    def __init__(
        self,
        specs: Iterable[BackendSpec],
        algorithm: str,
        *,
        clock: Callable[[], float],
        rng: random.Random,
        outlier: OutlierSettings,
        retries: RetrySettings,
        slow_start: float = 0.0,
    ) -> None:
        self.clock = clock
        self.rng = rng
        self.slow_start = SlowStart(slow_start) if slow_start > 0 else None
        self.backends: dict[str, Backend] = {}
        self.outlier = OutlierDetector(
            consecutive_failures=outlier.consecutive_failures,
            consecutive_5xx=outlier.consecutive_5xx,
            base_ejection=outlier.base_ejection,
            max_ejection=outlier.max_ejection,
            max_ejection_percent=outlier.max_ejection_percent,
        )
        self.budget = RetryBudget(
            ratio=retries.budget_ratio, min_per_second=retries.budget_min_per_second
        )
        self.unbudgeted = 0  # requests not yet reported to the retry budget
        # a worker process swaps these (shared in-flight counts, supervisor-decided outliers)
        self.algorithms: Callable[[str, random.Random], Algorithm] = make_algorithm
        self.make_backend: Callable[[BackendSpec, Callable[[], float], SlowStart | None], Backend]
        self.make_backend = Backend
        self.remote: Remote | None = None
        self.scheduler: Algorithm = make_algorithm(algorithm, rng)
        self.algorithm = algorithm
        self.mode = "none"
        self._mode_known = False
        self._eligible: list[Backend] = []
        self._eligible_until = -1.0
        self.on_event: Callable[[EventKind, str, str], None] = lambda kind, backend, detail: None
        for spec in specs:
            self.add(spec)

    # membership -----------------------------------------------------------------
    def add(self, spec: BackendSpec, discovered: bool = False) -> Backend:
        backend = self.make_backend(spec, self.clock, self.slow_start)
        backend.discovered = discovered
        self.backends[backend.id] = backend
        self.outlier.add(backend.id)
        self.invalidate()
        return backend

    def remove(self, backend_id: str) -> None:
        backend = self.backends.pop(backend_id, None)
        if backend is None:
            return
        self.outlier.remove(backend_id)
        self.scheduler.forget(backend_id)
        self.invalidate()

    def set_algorithm(self, algorithm: str) -> None:
        # the new scheduler takes over for the next pick; in-flight requests are untouched
        self.scheduler = self.algorithms(algorithm, self.rng)
        self.algorithm = algorithm

    def invalidate(self) -> None:
        self._eligible_until = -1.0

    # the hot path ---------------------------------------------------------------
    def eligible(self, now: float) -> list[Backend]:
        if now >= self._eligible_until:
            for b in self.backends.values():
                b.weight = b.effective_weight(now)
            members, mode = eligible(list(self.backends.values()), self._is_ejected_now)
            if mode != self.mode:
                if self._mode_known:  # the first computation is no change
                    self.on_event(EventKind.POOL_MODE, "", f"{self.mode} -> {mode}")
                self.mode = mode
            self._mode_known = True
            self._eligible = members
            # ejections expire by time and slow start changes weights: re-derive often
            self._eligible_until = now + 0.1
        return self._eligible

    def _is_ejected_now(self, backend_id: str) -> bool:
        if self.remote is not None:
            return self.remote.ejected(backend_id)
        return self.outlier.is_ejected(backend_id, self.clock())

    def pick(self, key: bytes | None, exclude: tuple[str, ...] = ()) -> Backend | None:
        now = self.clock()
        members = self._eligible if now < self._eligible_until else self.eligible(now)
        if exclude:
            members = [b for b in members if b.id not in exclude]
        return self.scheduler.pick(members, key)

    # outcomes from the data path -------------------------------------------------
    def success(self, backend: Backend) -> None:
        if backend.suspect:  # nothing to reset otherwise: skip the lookup per request
            backend.suspect = False
            if self.remote is not None:
                self.remote.success(backend.id)
            else:
                self.outlier.on_success(backend.id)

    def flush_budget(self, now: float) -> None:
        """Report the requests counted on the hot path to the retry budget."""
        if self.unbudgeted:
            self.budget.on_requests(now, self.unbudgeted)
            self.unbudgeted = 0

    def try_retry(self, now: float) -> bool:
        self.flush_budget(now)
        return self.budget.try_retry(now)

    def failure(self, backend: Backend, kind: str) -> None:
        now = self.clock()
        backend.suspect = True
        if self.remote is not None:
            self.remote.failure(backend.id, kind)
            return
        if kind not in ("connect", "reset", "timeout", "5xx"):
            kind = "reset"  # e.g. a protocol error: the connection was unusable
        ejection = self.outlier.on_failure(backend.id, kind, now)  # type: ignore[arg-type]
        if ejection is not None:
            backend.ejections += 1
            self.invalidate()
            self.on_event(
                EventKind.EJECTED,
                backend.id,
                f"{ejection.reason}; out for {ejection.until - ejection.at:.0f} s "
                f"(ejection #{ejection.times})",
            )

    # views -----------------------------------------------------------------------
    def state_of(self, backend: Backend) -> str:
        if backend.admin_state == "maint":
            return "maint"
        if backend.admin_state == "draining":
            return "drained" if backend.in_flight == 0 else "draining"
        if not backend.check_up:
            return "down"
        if self.outlier.is_ejected(backend.id, self.clock()):
            return "ejected"
        return "up"
