"""Health: pure cores for active checks, passive outlier ejection, slow start,
retry budgets and cluster eligibility.

No I/O and no clock reads: every method that depends on time takes ``now``
(seconds, monotonic) from the caller, so the asyncio drivers stay thin and the
tests drive a fake clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from balancer.config.schema import HealthCheckSettings

__all__ = [
    "STATES",
    "Ejection",
    "FailureKind",
    "HealthChecker",
    "Member",
    "Mode",
    "OutlierDetector",
    "RetryBudget",
    "SlowStart",
    "Transition",
    "eligible",
]

# Backend state vocabulary shared with the admin API.
STATES = ("up", "down", "ejected", "draining", "drained", "maint")


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def _at_least_one(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


# --- active checks ----------------------------------------------------------------------------
# Settings come validated from balancer.config (HealthCheckSettings).


@dataclass(frozen=True)
class Transition:
    old: str
    new: str
    reason: str
    at: float


class HealthChecker:
    """Per-backend state machine for active checks (rise/fall hysteresis).

    ``fall`` consecutive failures take an up backend down; ``rise`` consecutive
    successes bring a down one back. The driver runs the check (a timeout is a
    failure: see ``on_timeout``), feeds the result in, and sleeps
    ``next_delay()`` before the next one.
    """

    def __init__(self, config: HealthCheckSettings, now: float, initially_up: bool = True) -> None:
        self.config = config
        self._up = initially_up
        self._opposite = 0  # consecutive results disagreeing with the current state
        self._last_result: bool | None = None
        self._last_detail = ""
        self._last_change = now

    @property
    def up(self) -> bool:
        return self._up

    @property
    def state(self) -> str:
        return "up" if self._up else "down"

    @property
    def last_result(self) -> bool | None:
        """Outcome of the latest check, None before the first one."""
        return self._last_result

    @property
    def last_detail(self) -> str:
        return self._last_detail

    @property
    def last_change(self) -> float:
        """When the state last flipped (construction time if it never did)."""
        return self._last_change

    @property
    def pending(self) -> int:
        """Consecutive results opposite to the current state (0 = stable)."""
        return self._opposite

    def on_result(self, ok: bool, now: float, detail: str = "") -> Transition | None:
        self._last_result = ok
        self._last_detail = detail
        if ok == self._up:
            self._opposite = 0
            return None
        self._opposite += 1
        needed = self.config.rise if ok else self.config.fall
        if self._opposite < needed:
            return None
        old = self.state
        self._up = ok
        self._opposite = 0
        self._last_change = now
        what = "successful" if ok else "failed"
        reason = f"{needed} consecutive {what} checks"
        if detail:
            reason += f" (last: {detail})"
        return Transition(old=old, new=self.state, reason=reason, at=now)

    def on_timeout(self, now: float) -> Transition | None:
        """A check that did not answer within ``config.timeout`` counts as a failure."""
        return self.on_result(False, now, f"timeout after {self.config.timeout:g}s")

    def next_delay(self) -> float:
        if self._opposite > 0:  # confirming a change: never slower than the normal pace
            return min(self.config.fast_interval, self.config.interval)
        return self.config.interval


# --- passive checks (outlier detection) -------------------------------------------------------

FailureKind = Literal["connect", "reset", "timeout", "5xx"]


@dataclass(frozen=True)
class Ejection:
    id: str
    reason: str
    at: float
    until: float
    times: int  # how many times this backend has been ejected, this one included


@dataclass
class _Outlier:
    failures: int = 0  # consecutive connect/reset/timeout failures
    errors_5xx: int = 0  # consecutive 5xx responses
    times_ejected: int = 0
    ejected_until: float | None = None


class OutlierDetector:
    """Envoy-style passive health: eject backends that fail real requests.

    Cluster-level and pure. Two independent consecutive counters per backend:
    connection-level failures (connect/reset/timeout) against
    ``consecutive_failures`` and 5xx responses against ``consecutive_5xx``;
    any success resets both. An ejection lasts ``base_ejection * times``
    seconds capped at ``max_ejection`` and expires by time (or early through
    ``uneject`` when an active check succeeds). The multiplier does not decay.

    Ejecting is refused when it would exceed ``max_ejection_percent`` of the
    tracked backends or leave no other backend that is not ejected. The refused
    failure keeps its counter, so the next failure tries again.
    """

    def __init__(
        self,
        consecutive_failures: int = 3,
        consecutive_5xx: int = 5,
        base_ejection: float = 5.0,
        max_ejection: float = 60.0,
        max_ejection_percent: float = 50,
    ) -> None:
        _at_least_one("consecutive_failures", consecutive_failures)
        _at_least_one("consecutive_5xx", consecutive_5xx)
        _positive("base_ejection", base_ejection)
        _positive("max_ejection", max_ejection)
        if max_ejection < base_ejection:
            raise ValueError(
                f"max_ejection ({max_ejection:g}s) must be >= base_ejection ({base_ejection:g}s)"
            )
        if not 0 <= max_ejection_percent <= 100:
            raise ValueError(
                f"max_ejection_percent must be between 0 and 100, got {max_ejection_percent!r}"
            )
        self.consecutive_failures = consecutive_failures
        self.consecutive_5xx = consecutive_5xx
        self.base_ejection = base_ejection
        self.max_ejection = max_ejection
        self.max_ejection_percent = max_ejection_percent
        self._hosts: dict[str, _Outlier] = {}

    def add(self, target_id: str) -> None:
        self._hosts.setdefault(target_id, _Outlier())

    def remove(self, target_id: str) -> None:
        self._hosts.pop(target_id, None)

    def on_success(self, target_id: str) -> None:
        h = self._hosts.get(target_id)
        if h is not None:
            h.failures = 0
            h.errors_5xx = 0

    def on_failure(self, target_id: str, kind: FailureKind, now: float) -> Ejection | None:
        """Count a failed request; return the Ejection if this one triggered it.

        Unknown ids (backend already removed) and already-ejected backends are ignored.
        """
        h = self._hosts.get(target_id)
        if h is None or self.is_ejected(target_id, now):
            return None
        if kind == "5xx":
            h.errors_5xx += 1
            if h.errors_5xx < self.consecutive_5xx:
                return None
            reason = f"{h.errors_5xx} consecutive 5xx responses"
        else:
            h.failures += 1
            if h.failures < self.consecutive_failures:
                return None
            reason = f"{h.failures} consecutive failures (last: {kind})"
        if not self._may_eject(target_id, now):
            return None
        h.times_ejected += 1
        duration = min(self.base_ejection * h.times_ejected, self.max_ejection)
        h.ejected_until = now + duration
        h.failures = 0
        h.errors_5xx = 0
        return Ejection(
            id=target_id, reason=reason, at=now, until=h.ejected_until, times=h.times_ejected
        )

    def _may_eject(self, target_id: str, now: float) -> bool:
        ejected = 0
        serving = 0  # not ejected, other than the candidate
        for other_id in self._hosts:
            if self.is_ejected(other_id, now):
                ejected += 1
            elif other_id != target_id:
                serving += 1
        if serving == 0:
            return False
        return (ejected + 1) * 100 <= self.max_ejection_percent * len(self._hosts)

    def is_ejected(self, target_id: str, now: float) -> bool:
        """True while ejected; an expired ejection is cleared here (counters reset)."""
        h = self._hosts.get(target_id)
        if h is None or h.ejected_until is None:
            return False
        if now < h.ejected_until:
            return True
        h.ejected_until = None
        h.failures = 0
        h.errors_5xx = 0
        return False

    def ejected_until(self, target_id: str) -> float | None:
        h = self._hosts.get(target_id)
        return None if h is None else h.ejected_until

    def uneject(self, target_id: str) -> bool:
        """End an ejection early (active check succeeded). Returns whether it was ejected."""
        h = self._hosts.get(target_id)
        if h is None or h.ejected_until is None:
            return False
        h.ejected_until = None
        h.failures = 0
        h.errors_5xx = 0
        return True

    def ejection_count(self, target_id: str) -> int:
        h = self._hosts.get(target_id)
        return 0 if h is None else h.times_ejected


# --- slow start -------------------------------------------------------------------------------


class SlowStart:
    """Weight factor for a backend that just came up: linear ramp min_factor -> 1."""

    def __init__(self, duration: float, min_factor: float = 0.1) -> None:
        if not (math.isfinite(duration) and duration >= 0):
            raise ValueError(f"slow start duration must be >= 0 seconds, got {duration!r}")
        if not 0 < min_factor <= 1:
            raise ValueError(f"slow start min_factor must be in (0, 1], got {min_factor!r}")
        self.duration = duration
        self.min_factor = min_factor

    def factor(self, up_since: float | None, now: float) -> float:
        """``up_since=None`` means no recent up transition (e.g. up at startup): full weight."""
        if up_since is None or self.duration == 0:
            return 1.0
        elapsed = now - up_since
        if elapsed >= self.duration:
            return 1.0
        if elapsed <= 0:
            return self.min_factor
        return self.min_factor + (1.0 - self.min_factor) * (elapsed / self.duration)


# --- retry budget -----------------------------------------------------------------------------


class RetryBudget:
    """Caps retries at ``max(min_per_second * window, ratio * requests)`` per window.

    Callers report original requests with ``on_request`` (retries are not
    requests, so they cannot inflate their own budget) and ask ``try_retry``
    before each retry. Counts live in one bucket per whole second over a ring
    of ``ceil(window)`` buckets: memory is bounded whatever the traffic (so the
    window that counts is ``window`` rounded up to whole seconds).
    """

    def __init__(
        self, ratio: float = 0.2, min_per_second: float = 5.0, window: float = 10.0
    ) -> None:
        if not (math.isfinite(ratio) and ratio >= 0):
            raise ValueError(f"retry budget ratio must be >= 0, got {ratio!r}")
        if not (math.isfinite(min_per_second) and min_per_second >= 0):
            raise ValueError(f"retry budget min_per_second must be >= 0, got {min_per_second!r}")
        _positive("retry budget window", window)
        self.window = window
        self.configure(ratio, min_per_second)
        n = max(1, math.ceil(window))
        self._n = n
        self._second = [-1] * n  # which second each bucket currently holds
        self._requests = [0] * n
        self._retries = [0] * n
        self.retries_allowed = 0
        self.retries_denied = 0

    def configure(self, ratio: float, min_per_second: float) -> None:
        """New limits from a reload; the counts of the current window are kept."""
        self.ratio = ratio
        self.min_per_second = min_per_second
        self._floor = min_per_second * self.window

    def _bucket(self, now: float) -> int:
        sec = math.floor(now)
        i = sec % self._n
        if self._second[i] != sec:
            self._second[i] = sec
            self._requests[i] = 0
            self._retries[i] = 0
        return i

    def _totals(self, now: float) -> tuple[int, int]:
        sec = math.floor(now)
        oldest = sec - self._n
        requests = retries = 0
        for i in range(self._n):
            if oldest < self._second[i] <= sec:
                requests += self._requests[i]
                retries += self._retries[i]
        return requests, retries

    def on_request(self, now: float) -> None:
        self._requests[self._bucket(now)] += 1

    def on_requests(self, now: float, count: int) -> None:
        """Report `count` requests at once (the data path batches them off the hot path)."""
        if count > 0:
            self._requests[self._bucket(now)] += count

    def try_retry(self, now: float) -> bool:
        requests, retries = self._totals(now)
        if retries < max(self._floor, self.ratio * requests):
            self._retries[self._bucket(now)] += 1
            self.retries_allowed += 1
            return True
        self.retries_denied += 1
        return False


# --- cluster eligibility -------------------------------------------------------------------------


class Member(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def backup(self) -> bool: ...

    @property
    def admin_state(self) -> str:
        """One of "enabled", "draining", "maint"."""
        ...

    @property
    def check_up(self) -> bool:
        """Active check state."""
        ...


M = TypeVar("M", bound=Member)
Mode = Literal["normal", "backup", "panic", "none"]


def eligible(members: Sequence[M], ejected: Callable[[str], bool]) -> tuple[list[M], Mode]:
    """The members new requests may go to, and why.

    - "normal": enabled primaries whose check is up and that are not ejected;
    - "backup": no such primary, so the healthy enabled backups;
    - "panic": nothing healthy at all, so serve as well as possible: every
      enabled primary regardless of health, or every enabled backup if there is
      no enabled primary (like Envoy's panic mode);
    - "none": nothing is enabled (all draining or in maintenance).
    """
    primaries: list[M] = []
    backups: list[M] = []
    enabled_primaries: list[M] = []
    enabled_backups: list[M] = []
    for m in members:
        if m.admin_state != "enabled":
            continue
        healthy = m.check_up and not ejected(m.id)
        if m.backup:
            enabled_backups.append(m)
            if healthy:
                backups.append(m)
        else:
            enabled_primaries.append(m)
            if healthy:
                primaries.append(m)
    if primaries:
        return primaries, "normal"
    if backups:
        return backups, "backup"
    if enabled_primaries:
        return enabled_primaries, "panic"
    if enabled_backups:
        return enabled_backups, "panic"
    return [], "none"
