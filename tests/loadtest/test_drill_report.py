"""Metric math on hand-built timelines (no processes, no clocks)."""

from __future__ import annotations

from pathlib import Path

from harness.traffic import Outcome
from loadtest.report import (
    DrillEvent,
    StateSample,
    active_at,
    build_report,
    detect_time,
    disrupted,
    failover_time,
    failure_kind,
    percentile,
    plot,
    plot_series,
    recover_time,
    to_markdown,
)

B2 = "127.0.0.1:9102"


def ok(t: float, backend: str = "b1", latency: float = 0.01) -> Outcome:
    return Outcome(t, latency, 200, None, backend)


def err(t: float) -> Outcome:
    return Outcome(t, None, None, "ClientConnectorError: refused", None)


def sample(t: float, state: str, role: str = "standalone", name: str = "a") -> StateSample:
    return StateSample(t, name, True, role, {B2: state, "127.0.0.1:9101": "up"})


KILL = DrillEvent(2.0, "kill", "b2")
RESTART = DrillEvent(5.0, "restart", "b2")


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
    assert percentile([5.0], 99) == 5.0


def test_detect_is_first_non_up_sample_after_the_fault() -> None:
    samples = [
        sample(1.9, "up"),
        sample(2.1, "up"),
        sample(2.3, "down", role="passive", name="b"),  # a passive's view does not count
        sample(2.4, "ejected"),
        sample(2.5, "down"),
    ]
    assert detect_time([KILL], samples, B2) == 2.4 - 2.0
    assert detect_time([KILL], samples[:2], B2) is None
    assert detect_time([], samples, B2) is None
    unreachable = [StateSample(2.2, "a", False)]
    assert detect_time([KILL], unreachable, B2) is None


def test_recover_needs_up_in_state_and_traffic_served() -> None:
    samples = [sample(4.0, "down"), sample(5.2, "down"), sample(5.5, "up")]
    outcomes = [ok(5.1, "b1"), ok(5.3, "b2", latency=0.02), ok(6.0, "b2")]
    assert recover_time([KILL, RESTART], samples, outcomes, B2, "b2") == 5.5 - 5.0
    late = [ok(5.1, "b1"), ok(5.9, "b2", latency=0.1)]  # served after the state flip
    assert recover_time([KILL, RESTART], samples, late, B2, "b2") == (5.9 + 0.1) - 5.0
    assert recover_time([KILL, RESTART], samples, [ok(5.3, "b1")], B2, "b2") is None
    assert recover_time([KILL], samples, outcomes, B2, "b2") is None


def test_failover_is_first_good_send_after_first_bad_send() -> None:
    kill = DrillEvent(2.0, "kill", "a")
    outcomes = [err(1.99), ok(2.01), err(2.05), err(2.1), ok(2.2, "b", latency=1.5), ok(2.6)]
    # err at 1.99 predates the kill; the 1.5 s success at 2.2 is a stall, i.e. bad
    assert failover_time([kill], outcomes) == 2.6 - 2.0
    assert failover_time([kill], outcomes, stall_s=2.0) == 2.2 - 2.0
    # nothing failed over: null, not 0.0
    assert failover_time([kill], [ok(1.0), ok(2.1), ok(2.2)]) is None
    assert failover_time([kill], [ok(1.0), err(2.1)]) is None
    assert failover_time([], outcomes) is None


def test_active_at_reads_the_last_round_before_a_moment() -> None:
    samples = [
        StateSample(1.0, "a", True, "active"),
        StateSample(1.0, "b", True, "passive"),
        StateSample(3.0, "a", False),
        StateSample(3.0, "b", True, "active"),
    ]
    assert active_at(samples, 2.0) == "a"
    assert active_at(samples, 10.0) == "b"
    assert active_at([], 1.0) is None


def test_build_report_phases_counts_and_outputs(tmp_path: Path) -> None:
    t0 = 100.0
    outcomes = [ok(t0 + i * 0.5, "b1" if i % 2 else "b2") for i in range(4)]  # 0..1.5 s
    outcomes += [err(t0 + 2.5), ok(t0 + 3.0, "b1"), ok(t0 + 5.8, "b2"), ok(t0 + 7.0, "b1")]
    events = [DrillEvent(t0 + 2.0, "kill", "b2"), DrillEvent(t0 + 5.0, "restart", "b2")]
    samples = [
        StateSample(t0 + s.t, s.balancer, s.reachable, s.role, s.backends)
        for s in (sample(1.0, "up"), sample(2.2, "down"), sample(5.6, "up"))
    ]
    r = build_report(
        scenario="kill-backend",
        target="test",
        rate=2,
        duration=8,
        t0=t0,
        outcomes=outcomes,
        events=events,
        samples=samples,
        faulted="b2",
        backend_id=B2,
    )
    assert r["counts"]["sent"] == 8 and r["failed_requests"] == 1
    assert r["counts"]["by_status"] == {"200": 7}
    assert r["detect_s"] == 0.2 and r["failover_s"] == 1.0
    assert r["recover_s"] == round(5.81 - 5.0, 3)  # served at 5.81 > up at 5.6
    lat = r["latency"]
    assert (lat["before"]["n"], lat["during"]["n"], lat["after"]["n"]) == (4, 3, 1)
    assert lat["during"]["failed"] == 1 and lat["before"]["p50_ms"] == 10.0
    assert r["per_backend"] == {"b1": 4, "b2": 3}
    assert r["per_backend_by_phase"]["during"] == {"b1": 1, "b2": 1}
    assert [e["t"] for e in r["events"]] == [2.0, 5.0]
    assert len(r["timeline"]) == 8 and r["timeline"][2]["failed"] == 1
    md = to_markdown(r)
    assert "| detect_s | 0.2 |" in md and "| b2 | 2 | 1 | 0 | 3 |" in md
    # one balancer polled: no active before/after row, no pair keys
    assert "active before" not in md and "active_before" not in r
    assert r["markers"] == {
        "fault": 2.0,
        "detect": 2.2,
        "takeover": None,
        "failover": 3.0,
        "restore": 5.0,
        "recovered": 5.81,
    }
    plot(r, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failures_split_by_what_the_connection_did() -> None:
    assert failure_kind(ok(1.0)) is None
    assert failure_kind(Outcome(1.0, None, None, "ServerDisconnectedError", None, "reused")) == (
        "in_flight"
    )
    assert failure_kind(Outcome(1.0, None, None, "timeout", None, "new")) == "in_flight"
    assert failure_kind(Outcome(1.0, 0.01, 502, None, None, "reused")) == "in_flight"
    assert failure_kind(Outcome(1.0, None, None, "ClientConnectorError: x", None, "failed")) == (
        "new_connection"
    )
    assert failure_kind(Outcome(1.0, None, None, "timeout", None, "waiting")) == "new_connection"
    # no connection record (hand-built outcomes): the error class decides
    assert failure_kind(err(1.0)) == "new_connection"
    assert failure_kind(Outcome(1.0, None, None, "ServerDisconnectedError", None)) == "in_flight"


def pair_report(outcomes: list[Outcome], target: str = "docker") -> dict[str, object]:
    kill = DrillEvent(2.0, "kill", "a")
    samples = [
        StateSample(1.0, "a", True, "active"),
        StateSample(1.0, "b", True, "passive"),
        StateSample(3.0, "a", False),
        StateSample(3.0, "b", True, "active"),
    ]
    return build_report(
        scenario="kill-active-balancer",
        target=target,
        rate=10,
        duration=4,
        t0=0.0,
        outcomes=outcomes,
        events=[kill],
        samples=samples,
        faulted="a",
        kind="balancer",
    )


def test_balancer_report_counts_in_flight_and_new_connection_losses() -> None:
    lost = Outcome(2.01, None, None, "ServerDisconnectedError", None, "reused")
    refused = Outcome(2.2, None, None, "ClientConnectorError: refused", None, "failed")
    r = pair_report([ok(1.0), lost, refused, ok(2.9, "b1")])
    assert (r["failed_requests"], r["failed_in_flight"], r["failed_new_connections"]) == (2, 1, 1)
    assert r["active_before"] == "a" and r["active_after"] == "b" and r["active_changed"] is True
    assert r["takeover_s"] == 1.0  # b seen active at 3.0, fault at 2.0

    assert r["disrupted"] is True and r["failover_s"] == 0.9
    notes = " ".join(str(n) for n in r["notes"])  # type: ignore[attr-defined]
    assert "1 request(s) failed in flight" in notes and "keepalived" in notes
    assert "retries the VIP" in notes
    md = to_markdown(r)
    assert "| failed in flight | 1 |" in md and "| failed new connections | 1 |" in md
    assert "| active before / after | a / b |" in md
    local = pair_report([ok(1.0), refused], target="local")
    assert "nobody listens" in " ".join(str(n) for n in local["notes"])  # type: ignore[attr-defined]


def test_nothing_failed_over_gives_null_failover() -> None:
    r = pair_report([ok(1.0), ok(2.5), ok(3.5)])
    assert r["failover_s"] is None and r["disrupted"] is False
    assert r["markers"] == {
        "fault": 2.0,
        "detect": None,
        "takeover": 3.0,
        "failover": None,
        "restore": None,
        "recovered": None,
    }
    assert disrupted([DrillEvent(2.0, "kill", "a")], [err(2.5)], 1.0) is True
    assert disrupted([], [err(2.5)], 1.0) is False


def test_plot_series_steps_cover_their_own_second() -> None:
    outcomes = [ok(i / 10, "b1" if i % 2 else "b2") for i in range(30)]  # 10/s for 3 s
    outcomes = [o for o in outcomes if not (2.0 <= o.t_send < 3.0 and o.backend == "b2")]
    outcomes += [err(2.05)]
    r = build_report(
        scenario="kill-backend",
        target="t",
        rate=10,
        duration=3,
        t0=0.0,
        outcomes=outcomes,
        events=[DrillEvent(2.0, "kill", "b2")],
        samples=[],
        faulted="b2",
    )
    d = plot_series(r)
    # bucket i spans [i, i+1): the drop of b2 starts at the bucket that holds the fault
    assert d["edges"] == [0.0, 1.0, 2.0, 3.0]
    assert d["backends"] == {"b1": [5, 5, 5], "b2": [5, 5, 0]}
    assert d["sent"] == [10, 10, 6] and d["ok"] == [10, 10, 5] and d["failed"] == [0, 0, 1]
    assert d["markers"] == {"fault": 2.0, "failover": 2.1}  # absolute times


def test_a_backend_drill_with_a_pair_has_no_takeover() -> None:
    samples = [StateSample(2.1, "a", True, "active"), StateSample(2.1, "b", True, "passive")]
    r = build_report(
        scenario="stop-backend",
        target="docker",
        rate=1,
        duration=3,
        t0=0.0,
        outcomes=[ok(1.0), ok(2.5)],
        events=[DrillEvent(2.0, "stop", "b2")],
        samples=samples,
        faulted="b2",
    )
    assert r["active_before"] is None and r["active_after"] == "a"
    assert r["takeover_s"] is None and r["markers"]["takeover"] is None
