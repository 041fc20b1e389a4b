"""restart-backend and scale-backends: their event and metric logic on hand-built timelines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.traffic import Outcome
from loadtest import drill
from loadtest.drill import action_events, scale_summary
from loadtest.report import DrillEvent, StateSample, build_report, fault_event, restore_event
from loadtest.targets import SCENARIOS, LocalTarget

NEW = "172.28.0.140:8080"
OLD = "172.28.0.129:8080"


def ok(t: float, backend: str = "old", latency: float = 0.01) -> Outcome:
    return Outcome(t, latency, 200, None, backend)


def sample(t: float, ids: dict[str, str], role: str = "active", name: str = "a") -> StateSample:
    return StateSample(t, name, True, role, {OLD: "up", **ids})


ADD = DrillEvent(2.0, "add", "new")
REMOVE = DrillEvent(6.0, "remove", "new")


def test_new_scenarios_are_registered() -> None:
    assert SCENARIOS["restart-backend"].fault == "restart"
    assert SCENARIOS["restart-backend"].restore is None
    scale = SCENARIOS["scale-backends"]
    assert (scale.fault, scale.restore, scale.docker_only) == ("add", "remove", True)


def test_restart_as_fault_is_a_stop_then_a_restart() -> None:
    events = action_events("restart", "b2", 1.0, 1.4, "restarted", is_fault=True)
    assert [(e.kind, e.t) for e in events] == [("stop", 1.0), ("restart", 1.4)]
    # so the report's fault/restore definitions apply unchanged
    assert fault_event(events) == events[0] and restore_event(events) == events[1]


def test_other_actions_are_one_event() -> None:
    assert action_events("restart", "b2", 3.0, 3.5, "d", is_fault=False) == [
        DrillEvent(3.0, "restart", "b2", "d")
    ]
    assert action_events("kill", "a", 1.0, 1.1, "d", is_fault=True) == [
        DrillEvent(1.0, "kill", "a", "d")
    ]


def test_restart_drill_report_has_detect_and_recover() -> None:
    events = action_events("restart", "b2", 2.0, 2.5, "restarted", is_fault=True)
    samples = [
        StateSample(1.9, "a", True, "active", {OLD: "up"}),
        StateSample(2.2, "a", True, "active", {}),  # dropped by discovery
        StateSample(2.8, "a", True, "active", {OLD: "up"}),
    ]
    outcomes = [ok(1.0, "b2"), ok(2.1, "b1"), ok(2.9, "b2")]
    r = build_report(
        scenario="restart-backend",
        target="t",
        rate=1,
        duration=4,
        t0=0.0,
        outcomes=outcomes,
        events=events,
        samples=samples,
        faulted="b2",
        backend_id=OLD,
    )
    assert r["detect_s"] == pytest.approx(0.2)
    assert r["recover_s"] == pytest.approx(0.3 + 0.01 + 0.1)  # served at 2.91, up at 2.8
    assert r["failed_requests"] == 0


def test_added_is_later_of_up_in_state_and_first_served() -> None:
    samples = [sample(1.5, {}), sample(3.0, {NEW: "up"}), sample(3.5, {NEW: "up"})]
    outcomes = [ok(2.5), ok(3.2, "new", latency=0.05), ok(3.4, "new")]
    s = scale_summary([ADD], samples, outcomes, "new", NEW)
    assert s["added_s"] == pytest.approx(3.25 - 2.0)
    assert s["served_by_added"] == 2
    assert s["removed_s"] is None  # never removed
    early = [ok(2.6, "new", latency=0.1)]  # served before any sample showed it up
    assert scale_summary([ADD], samples, early, "new", NEW)["added_s"] == pytest.approx(1.0)


def test_added_ignores_the_passive_view_and_needs_traffic() -> None:
    passive_only = [sample(3.0, {NEW: "up"}, role="passive", name="b")]
    assert scale_summary([ADD], passive_only, [ok(3.1, "new")], "new", NEW)["added_s"] is None
    up = [sample(3.0, {NEW: "up"})]
    assert scale_summary([ADD], up, [ok(3.1, "old")], "new", NEW)["added_s"] is None


def test_removed_waits_until_no_balancer_lists_it() -> None:
    samples = [
        sample(3.0, {NEW: "up"}),
        sample(6.1, {NEW: "draining"}),
        sample(6.2, {NEW: "up"}, role="passive", name="b"),  # the passive still lists it
        sample(6.5, {}),
        StateSample(6.6, "b", False),  # unreachable: says nothing
        sample(7.0, {}, role="passive", name="b"),
    ]
    s = scale_summary([ADD, REMOVE], samples, [ok(3.1, "new")], "new", NEW)
    assert s["removed_s"] == pytest.approx(0.5)
    relisted = [*samples, sample(7.5, {NEW: "up"})]
    assert scale_summary([ADD, REMOVE], relisted, [], "new", NEW)["removed_s"] is None


def test_failed_add_gives_no_metrics() -> None:
    s = scale_summary([ADD, REMOVE], [sample(3.0, {})], [], "new", None)
    assert s == {
        "added_backend": "new",
        "added_backend_id": None,
        "served_by_added": 0,
        "added_s": None,
        "removed_s": None,
    }


def test_local_target_cannot_add_backends(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(drill.DrillError, match="cannot add backends"):
        LocalTarget().extra_backend_name()
    assert drill.main(["scale-backends", "--local", "--json", "x.json"]) == 2
    err = capsys.readouterr().err
    assert err == "drill: scenario scale-backends needs the docker target\n"


def test_local_restart_backend_drill(tmp_path: Path) -> None:
    out = tmp_path / "rb.json"
    argv = ["restart-backend", "--local", "--quiet", "--no-expect", "--json", str(out)]
    assert drill.main([*argv, "--rate", "50", "--duration", "5", "--fault-at", "1.5"]) == 0
    r = json.loads(out.read_text())
    assert [e["kind"] for e in r["events"]] == ["stop", "restart"]
    assert r["events"][1]["detail"].startswith("restarted (pid ")
    assert r["detect_s"] is not None  # SIGTERM took b2 out
    assert r["per_backend_by_phase"]["before"].keys() == {"b1", "b2", "b3"}


def test_local_stop_backend_drill_checks_its_expectations(tmp_path: Path) -> None:
    """Through the harness: a false condition makes the exit status 1, and the report lists
    every condition with what was measured."""
    out, md = tmp_path / "sb.json", tmp_path / "sb.md"
    argv = ["stop-backend", "--local", "--quiet", "--json", str(out), "--md", str(md)]
    argv += ["--rate", "50", "--duration", "5", "--fault-at", "1.5", "--no-expect"]
    argv += ["--expect", "failed_requests==0", "--expect", "counts.sent<0"]
    assert drill.main(argv) == 1  # counts.sent<0 cannot hold
    r = json.loads(out.read_text())
    assert r["expectations"] == [
        {"condition": "failed_requests==0", "measured": 0, "ok": True},  # SIGTERM loses nothing
        {"condition": "counts.sent<0", "measured": 250, "ok": False},
    ]
    assert r["expectations_met"] is False
    assert r["failed_in_flight"] == r["failed_new_connections"] == 0
    assert "active_before" not in r  # one balancer: no pair rows
    text = md.read_text()
    assert "Expectations (NOT met)" in text and "| `counts.sent<0` | 250 | NO |" in text


def test_local_kill_active_balancer_counts_refused_connections(tmp_path: Path) -> None:
    out = tmp_path / "kab.json"
    argv = ["kill-active-balancer", "--local", "--quiet", "--json", str(out)]
    argv += ["--rate", "50", "--duration", "5", "--fault-at", "1.5"]
    assert drill.main(argv) == 0  # the default: the other balancer became active
    r = json.loads(out.read_text())
    assert (r["active_before"], r["active_after"], r["active_changed"]) == ("a", "b", True)
    assert r["failed_requests"] == r["failed_in_flight"] + r["failed_new_connections"]
    assert r["failed_new_connections"] > 0  # nobody listens on the shared port meanwhile
    assert "nobody listens" in r["notes"][1]
    assert r["markers"]["takeover"] is not None
