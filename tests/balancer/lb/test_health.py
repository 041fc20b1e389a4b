"""Unit tests for balancer.health, all on a fake clock (plain floats)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from balancer.config import HealthCheckSettings
from balancer.lb.health import (
    HealthChecker,
    OutlierDetector,
    RetryBudget,
    SlowStart,
    Transition,
    eligible,
)

# --- HealthCheckSettings (validated in balancer.config) ----------------------------------------


def test_check_config_defaults_detect_dead_backend_within_one_second() -> None:
    cfg = HealthCheckSettings()
    assert (cfg.path, cfg.interval, cfg.fast_interval, cfg.timeout, cfg.rise, cfg.fall) == (
        "/healthz",
        0.5,
        0.2,
        0.5,
        2,
        2,
    )
    # Worst case for a refused connection: death just after a check, one interval to the
    # first failure, then (fall - 1) fast intervals to confirm.
    assert cfg.interval + (cfg.fall - 1) * cfg.fast_interval <= 1.0


def test_fast_interval_never_slows_a_check_down() -> None:
    # confirming a change uses fast_interval, but never a longer one than the normal pace
    hc = HealthChecker(HealthCheckSettings(interval=0.1, fast_interval=0.2), now=0.0)
    assert hc.next_delay() == 0.1
    assert hc.on_result(False, 0.1) is None  # one failure of two: confirming
    assert hc.next_delay() == 0.1


# --- HealthChecker ----------------------------------------------------------------------------


def test_fall_needs_consecutive_failures() -> None:
    hc = HealthChecker(HealthCheckSettings(fall=3), now=0.0)
    assert hc.up and hc.state == "up" and hc.last_result is None
    assert hc.on_result(False, 1.0, "connection refused") is None
    assert hc.on_result(False, 2.0) is None
    assert hc.up
    t = hc.on_result(False, 3.0, "connection refused")
    assert t == Transition(
        old="up",
        new="down",
        reason="3 consecutive failed checks (last: connection refused)",
        at=3.0,
    )
    assert not hc.up and hc.state == "down"
    assert hc.last_change == 3.0
    assert hc.last_result is False and hc.last_detail == "connection refused"
    # Further failures while down are not transitions.
    assert hc.on_result(False, 4.0) is None


def test_success_interrupts_a_fall() -> None:
    hc = HealthChecker(HealthCheckSettings(fall=2), now=0.0)
    assert hc.on_result(False, 1.0) is None
    assert hc.on_result(True, 2.0) is None  # resets the count
    assert hc.on_result(False, 3.0) is None
    assert hc.up
    assert hc.on_result(False, 4.0) is not None
    assert not hc.up


def test_rise_brings_backend_back() -> None:
    hc = HealthChecker(HealthCheckSettings(rise=2), now=5.0, initially_up=False)
    assert not hc.up and hc.last_change == 5.0
    assert hc.on_result(True, 6.0, "200") is None
    assert hc.on_result(False, 7.0) is None  # flapping resets the rise count
    assert hc.on_result(True, 8.0) is None
    t = hc.on_result(True, 9.0, "200")
    assert t is not None
    assert (t.old, t.new, t.at) == ("down", "up", 9.0)
    assert "2 consecutive successful checks" in t.reason
    assert hc.up and hc.last_change == 9.0


def test_rise_and_fall_of_one_flip_immediately() -> None:
    hc = HealthChecker(HealthCheckSettings(rise=1, fall=1), now=0.0)
    assert hc.on_result(False, 1.0) is not None
    assert hc.on_result(True, 2.0) is not None
    assert hc.up


def test_fast_interval_while_transitioning() -> None:
    cfg = HealthCheckSettings(interval=0.5, fast_interval=0.2, rise=3, fall=2)
    hc = HealthChecker(cfg, now=0.0)
    assert hc.next_delay() == 0.5
    hc.on_result(True, 0.5)
    assert hc.next_delay() == 0.5
    hc.on_result(False, 1.0)
    assert hc.pending == 1
    assert hc.next_delay() == 0.2  # confirming a suspected failure quickly
    hc.on_result(False, 1.2)  # now down: stable again
    assert not hc.up and hc.pending == 0
    assert hc.next_delay() == 0.5
    hc.on_result(True, 1.7)
    hc.on_result(True, 1.9)
    assert hc.next_delay() == 0.2  # rising, not there yet
    hc.on_result(True, 2.1)
    assert hc.up and hc.next_delay() == 0.5


def test_timeout_counts_as_failure() -> None:
    hc = HealthChecker(HealthCheckSettings(timeout=0.5, fall=2), now=0.0)
    assert hc.on_timeout(1.0) is None
    assert hc.last_result is False
    assert hc.last_detail == "timeout after 0.5s"
    t = hc.on_timeout(1.2)
    assert t is not None and t.new == "down"
    assert "timeout after 0.5s" in t.reason


def test_dead_backend_detected_within_one_second_on_fake_clock() -> None:
    # Drive the checker the way the asyncio driver does: check, then sleep next_delay().
    hc = HealthChecker(HealthCheckSettings(), now=0.0)
    died_at = 0.01
    now = 0.0
    transition = None
    for _ in range(20):
        transition = hc.on_result(now < died_at, now)
        if transition is not None:
            break
        now += hc.next_delay()
    assert transition is not None and transition.new == "down"
    assert transition.at - died_at <= 1.0


# --- OutlierDetector --------------------------------------------------------------------------


def cluster(*ids: str, **kwargs: object) -> OutlierDetector:
    od = OutlierDetector(**kwargs)  # type: ignore[arg-type]
    for i in ids:
        od.add(i)
    return od


def test_ejects_after_consecutive_failures() -> None:
    od = cluster("a", "b", "c", "d", consecutive_failures=3)
    assert od.on_failure("a", "connect", 1.0) is None
    assert od.on_failure("a", "reset", 1.1) is None
    ej = od.on_failure("a", "timeout", 1.2)
    assert ej is not None
    assert (ej.id, ej.at, ej.until, ej.times) == ("a", 1.2, 6.2, 1)
    assert ej.reason == "3 consecutive failures (last: timeout)"
    assert od.is_ejected("a", 1.3)
    assert not od.is_ejected("b", 1.3)
    assert od.ejection_count("a") == 1


def test_consecutive_5xx_counted_separately() -> None:
    od = cluster("a", "b", "c", consecutive_failures=3, consecutive_5xx=5)
    for i in range(4):
        assert od.on_failure("a", "5xx", float(i)) is None
    ej = od.on_failure("a", "5xx", 4.0)
    assert ej is not None and ej.reason == "5 consecutive 5xx responses"


def test_success_resets_the_counter() -> None:
    od = cluster("a", "b", "c", "d", consecutive_failures=3, consecutive_5xx=2)
    od.on_failure("a", "connect", 1.0)
    od.on_failure("a", "connect", 1.1)
    od.on_failure("a", "5xx", 1.1)
    od.on_success("a")
    assert od.on_failure("a", "connect", 1.2) is None
    assert od.on_failure("a", "connect", 1.3) is None
    assert od.on_failure("a", "5xx", 1.3) is None
    assert not od.is_ejected("a", 1.4)
    assert od.on_failure("a", "connect", 1.5) is not None


def test_ejection_time_multiplies_and_caps() -> None:
    od = cluster("a", "b", "c", "d", consecutive_failures=1, base_ejection=5.0, max_ejection=12.0)
    now = 0.0
    durations = []
    for _ in range(4):
        ej = od.on_failure("a", "connect", now)
        assert ej is not None
        durations.append(ej.until - ej.at)
        now = ej.until  # expiry
        assert not od.is_ejected("a", now)
    assert durations == [5.0, 10.0, 12.0, 12.0]
    assert od.ejection_count("a") == 4


def test_ejection_expires_by_time() -> None:
    od = cluster("a", "b", consecutive_failures=1, base_ejection=5.0)
    od.on_failure("a", "connect", 10.0)
    assert od.is_ejected("a", 14.999)
    assert od.ejected_until("a") == 15.0
    assert not od.is_ejected("a", 15.0)
    assert od.ejected_until("a") is None
    # Failures while ejected do not extend or stack ejections.
    od.on_failure("b", "connect", 20.0)
    assert od.on_failure("b", "connect", 21.0) is None
    assert od.ejection_count("b") == 1


def test_uneject_after_successful_active_check() -> None:
    od = cluster("a", "b", consecutive_failures=2)
    od.on_failure("a", "connect", 0.0)
    od.on_failure("a", "connect", 0.1)
    assert od.is_ejected("a", 0.2)
    assert od.uneject("a") is True
    assert not od.is_ejected("a", 0.2)
    assert od.uneject("a") is False  # not ejected any more
    assert od.ejection_count("a") == 1  # history kept: the next ejection is longer
    od.on_failure("a", "connect", 1.0)
    ej = od.on_failure("a", "connect", 1.1)
    assert ej is not None and ej.times == 2 and ej.until == pytest.approx(11.1)


def test_never_ejects_the_last_healthy_backend() -> None:
    od = cluster("a", "b", consecutive_failures=1, max_ejection_percent=100)
    assert od.on_failure("a", "connect", 0.0) is not None
    assert od.on_failure("b", "connect", 0.0) is None
    assert not od.is_ejected("b", 0.0)
    # The counter is kept: once "a" is back, the next failure of "b" ejects it.
    od.uneject("a")
    assert od.on_failure("b", "connect", 1.0) is not None


def test_single_backend_is_never_ejected() -> None:
    od = cluster("only", consecutive_failures=1, max_ejection_percent=100)
    for i in range(5):
        assert od.on_failure("only", "connect", float(i)) is None
    assert not od.is_ejected("only", 5.0)


def test_max_ejection_percent() -> None:
    od = cluster(*"abcd", consecutive_failures=1, max_ejection_percent=50)
    assert od.on_failure("a", "connect", 0.0) is not None
    assert od.on_failure("b", "connect", 0.0) is not None
    assert od.on_failure("c", "connect", 0.0) is None  # 3 of 4 would be 75 %
    # Once one ejection expires there is room again.
    assert not od.is_ejected("a", 100.0)
    assert od.on_failure("c", "connect", 100.0) is not None


def test_unknown_and_removed_ids_are_ignored() -> None:
    od = cluster("a", "b", consecutive_failures=1)
    od.remove("a")
    od.remove("zzz")
    assert od.on_failure("a", "connect", 0.0) is None
    od.on_success("a")
    assert not od.is_ejected("a", 0.0)
    assert od.uneject("a") is False
    assert od.ejection_count("a") == 0
    assert od.ejected_until("a") is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"consecutive_failures": 0}, "consecutive_failures must be an integer >= 1"),
        ({"consecutive_5xx": 0}, "consecutive_5xx must be an integer >= 1"),
        ({"base_ejection": 0}, "base_ejection must be a positive"),
        ({"base_ejection": 10, "max_ejection": 5}, "max_ejection .* must be >= base_ejection"),
        ({"max_ejection_percent": 101}, "max_ejection_percent must be between 0 and 100"),
    ],
)
def test_outlier_detector_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OutlierDetector(**kwargs)  # type: ignore[arg-type]


# --- SlowStart --------------------------------------------------------------------------------


def test_slow_start_ramp() -> None:
    ss = SlowStart(duration=10.0, min_factor=0.1)
    assert ss.factor(None, 123.0) == 1.0
    assert ss.factor(100.0, 100.0) == pytest.approx(0.1)
    assert ss.factor(100.0, 99.0) == pytest.approx(0.1)  # clock before up_since: clamp
    assert ss.factor(100.0, 105.0) == pytest.approx(0.55)
    assert ss.factor(100.0, 107.5) == pytest.approx(0.775)
    assert ss.factor(100.0, 110.0) == 1.0
    assert ss.factor(100.0, 500.0) == 1.0
    factors = [ss.factor(0.0, t / 10) for t in range(0, 101)]
    assert factors == sorted(factors)


def test_slow_start_zero_duration_is_off() -> None:
    ss = SlowStart(0.0)
    assert ss.factor(5.0, 5.0) == 1.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1.0,), "duration must be >= 0"),
        ((5.0, 0.0), "min_factor must be in"),
        ((5.0, 2.0), "min_factor must be in"),
    ],
)
def test_slow_start_validation(args: tuple[float, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SlowStart(*args)


# --- RetryBudget ------------------------------------------------------------------------------


def test_retry_budget_minimum_allows_a_few_retries_without_traffic() -> None:
    rb = RetryBudget(ratio=0.2, min_per_second=0.5, window=10.0)  # floor: 5 per window
    assert [rb.try_retry(1.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert (rb.retries_allowed, rb.retries_denied) == (5, 2)


def test_retry_budget_ratio_of_requests() -> None:
    rb = RetryBudget(ratio=0.2, min_per_second=0.0, window=10.0)
    for i in range(100):
        rb.on_request(i * 0.05)  # 100 requests over 5 s
    results = [rb.try_retry(5.0) for _ in range(25)]
    assert results.count(True) == 20
    assert results[20:] == [False] * 5


def test_retry_budget_window_expiry() -> None:
    rb = RetryBudget(ratio=0.0, min_per_second=0.2, window=10.0)  # 2 retries per 10 s
    assert rb.try_retry(0.0) and rb.try_retry(0.5)
    assert not rb.try_retry(9.9)
    assert not rb.try_retry(9.99)
    # Second 0's bucket leaves the window once second 10 starts.
    assert rb.try_retry(10.0)
    assert rb.try_retry(10.1)
    assert not rb.try_retry(10.2)
    # Requests age out too.
    rb2 = RetryBudget(ratio=0.5, min_per_second=0.0, window=2.0)
    for _ in range(10):
        rb2.on_request(0.0)
    assert rb2.try_retry(1.0)
    assert not rb2.try_retry(2.0)  # the 10 requests of second 0 are gone
    assert (rb2.retries_allowed, rb2.retries_denied) == (1, 1)


def test_retry_budget_memory_is_bounded() -> None:
    rb = RetryBudget(window=3.0)
    for s in range(1000):
        rb.on_request(s + 0.5)
        rb.try_retry(s + 0.5)
    assert len(rb._second) == len(rb._requests) == len(rb._retries) == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": -0.1}, "ratio must be >= 0"),
        ({"min_per_second": -1}, "min_per_second must be >= 0"),
        ({"window": 0}, "window must be a positive"),
    ],
)
def test_retry_budget_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryBudget(**kwargs)


# --- eligibility ------------------------------------------------------------------------------


@dataclass(frozen=True)
class M:
    id: str
    backup: bool = False
    admin_state: str = "enabled"
    check_up: bool = True


def ids(result: tuple[list[M], str]) -> tuple[list[str], str]:
    members, mode = result
    return [m.id for m in members], mode


def no_ejections(_: str) -> bool:
    return False


def test_eligible_normal_filters_unhealthy_ejected_and_disabled() -> None:
    members = [
        M("p1"),
        M("p2", check_up=False),
        M("p3"),
        M("p4", admin_state="draining"),
        M("p5", admin_state="maint"),
        M("b1", backup=True),
    ]
    assert ids(eligible(members, lambda i: i == "p3")) == (["p1"], "normal")
    assert ids(eligible(members, no_ejections)) == (["p1", "p3"], "normal")


def test_eligible_backup_mode() -> None:
    members = [
        M("p1", check_up=False),
        M("p2"),
        M("b1", backup=True),
        M("b2", backup=True, check_up=False),
        M("b3", backup=True, admin_state="maint"),
    ]
    assert ids(eligible(members, lambda i: i == "p2")) == (["b1"], "backup")


def test_eligible_panic_serves_enabled_primaries() -> None:
    members = [
        M("p1", check_up=False),
        M("p2"),
        M("p3", admin_state="draining"),
        M("b1", backup=True, check_up=False),
    ]
    assert ids(eligible(members, lambda i: i == "p2")) == (["p1", "p2"], "panic")


def test_eligible_panic_falls_back_to_backups() -> None:
    members = [
        M("p1", admin_state="maint"),
        M("b1", backup=True, check_up=False),
        M("b2", backup=True, check_up=False),
    ]
    assert ids(eligible(members, no_ejections)) == (["b1", "b2"], "panic")


def test_eligible_none() -> None:
    members = [M("p1", admin_state="maint"), M("b1", backup=True, admin_state="draining")]
    assert ids(eligible(members, no_ejections)) == ([], "none")
    assert ids(eligible([], no_ejections)) == ([], "none")


def test_eligible_with_outlier_detector_and_checker() -> None:
    # The pieces composed the way the cluster uses them.
    od = cluster("p1", "p2", consecutive_failures=1)
    od.on_failure("p1", "connect", 0.0)
    members = [M("p1"), M("p2")]
    assert ids(eligible(members, lambda i: od.is_ejected(i, 1.0))) == (["p2"], "normal")
    assert ids(eligible(members, lambda i: od.is_ejected(i, 60.0))) == (["p1", "p2"], "normal")
