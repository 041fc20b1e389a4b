"""The chaos soak: the schedule (pure), per-event accounting on synthetic outcomes, the
report, and two short real runs (one to the end, one interrupted) that leave nothing."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.netns import list_namespaces, sweep_stale
from harness.procs import REPO, python_env, wait_until
from harness.stack import wait_gone
from harness.traffic import Outcome
from loadtest import chaos
from loadtest.report import DrillEvent, StateSample

# ---- the schedule ------------------------------------------------------------------------


def test_schedule_is_deterministic_and_covers_every_kind() -> None:
    a = chaos.plan(3600, seed=7)
    assert a == chaos.plan(3600, seed=7)
    assert a != chaos.plan(3600, seed=8)
    assert {p.kind for p in a} == set(chaos.ALL_KINDS)
    assert len(a) == 59  # 60 s slots after a 30 s warm-up
    assert a[0].at == 30.0
    for p, q in itertools.pairwise(a):
        assert p.end == q.at  # slots tile the run
        if p.restore_at is not None:
            assert p.at < p.restore_at < p.end  # held, then a quiet gap
    assert all(p.target == "b3" for p in a if p.kind == "delay-backend")
    assert all(p.target == "active" for p in a if "balancer" in p.kind)
    assert all(p.restore_at is None for p in a if p.kind in ("renew-cert", "reload-config"))


def test_short_runs_compress_the_schedule_and_too_short_is_refused() -> None:
    five = chaos.plan(300, seed=1)
    assert sorted(p.kind for p in five) == sorted(chaos.ALL_KINDS)  # each once
    assert chaos.describe_plan(five, 1).startswith("chaos schedule (seed 1, 8 events)")
    with pytest.raises(chaos.ScheduleError, match="need at least"):
        chaos.plan(30, seed=1)
    with pytest.raises(chaos.ScheduleError, match="unknown event kind"):
        chaos.plan(300, seed=1, kinds=["melt-cpu"])


# ---- per-event accounting -----------------------------------------------------------------


def _ok(t: float, backend: str = "b1") -> Outcome:
    return Outcome(t, 0.002, 200, None, backend, "reused")


def _steady(t0: float, t1: float, per_s: int = 10) -> list[Outcome]:
    n = int((t1 - t0) * per_s)
    return [_ok(t0 + i / per_s, f"b{1 + i % 3}") for i in range(n)]


def _up(t: float, b2: str = "up", role: str = "active", name: str = "a") -> StateSample:
    return StateSample(t, name, True, role, {"b1": "up", "b2": b2, "b3": "up"})


def test_kill_backend_holds_without_failures_and_fails_with_one() -> None:
    p = chaos.Planned(0, "kill-backend", "b2", 10.0, 13.0, 20.0)
    events = [DrillEvent(10.0, "kill", "b2"), DrillEvent(13.0, "restart", "b2")]
    samples = [_up(9.9), _up(10.5, "down"), _up(13.5, "up")]
    outcomes = _steady(10, 20)
    row = chaos.account(
        p, rate=10, outcomes=outcomes, events=events, samples=samples,
        faulted="b2", backend_id="b2", checks={},
    )  # fmt: skip
    assert row["held"] is True
    assert row["detect_s"] == 0.5 and row["recover_s"] is not None
    assert row["failed_in_flight"] == 0 and row["requests"] == 100
    lost = Outcome(10.2, None, None, "ServerDisconnectedError", None, "reused")
    row = chaos.account(
        p, rate=10, outcomes=[*outcomes, lost], events=events, samples=samples,
        faulted="b2", backend_id="b2", checks={},
    )  # fmt: skip
    assert row["held"] is False
    assert row["failed_in_flight"] == 1 and row["failed_new_connections"] == 0
    assert {r["condition"]: r["ok"] for r in row["expectations"]}["failed_requests==0"] is False


def test_balancer_event_counts_refused_connections_against_the_takeover_budget() -> None:
    p = chaos.Planned(0, "kill-active-balancer", "active", 10.0, 13.0, 20.0)
    events = [DrillEvent(10.0, "kill", "a"), DrillEvent(13.0, "restart", "a")]
    samples = [
        StateSample(10.1, "a", False),  # killed: its admin API does not answer
        _up(10.1, role="passive", name="b"),
        _up(10.8, role="active", name="b"),
    ]
    refused = [Outcome(10 + i / 100, None, None, "ClientConnectorError", None, "failed")
               for i in range(7)]  # fmt: skip
    kw: dict[str, Any] = {"events": events, "samples": samples, "faulted": "a"}
    row = chaos.account(
        p, rate=10, outcomes=[*_steady(11, 20), *refused], backend_id=None,
        checks={"restart_ready": True}, **kw,
    )  # fmt: skip
    assert row["failed_new_connections"] == 7 and row["failed_in_flight"] == 0
    assert row["takeover_s"] == 0.8
    assert row["held"] is True  # 7 <= 10 req/s * 3 s
    many = [Outcome(10 + i / 100, None, None, "refused", None, "failed") for i in range(31)]
    row = chaos.account(
        p, rate=10, outcomes=many, backend_id=None, checks={"restart_ready": True}, **kw
    )
    assert row["held"] is False


def test_checks_and_skips() -> None:
    p = chaos.Planned(0, "renew-cert", "active", 5.0, None, 15.0)
    kw: dict[str, Any] = {"events": [DrillEvent(5.0, "renew", "a+b")], "samples": []}
    out = _steady(5, 15)
    base = {"rate": 10, "outcomes": out, "faulted": "a+b", "backend_id": None, **kw}
    assert chaos.account(p, checks={"serial_changed": True}, **base)["held"] is True
    assert chaos.account(p, checks={"serial_changed": False}, **base)["held"] is False
    assert chaos.account(p, checks={}, **base)["held"] is False  # nothing checked: no pass
    d = chaos.Planned(1, "delay-backend", "b3", 5.0, 8.0, 15.0)
    row = chaos.account(d, checks={}, skipped="no netem", **base)
    assert row["held"] is None and row["skipped"] == "no netem" and row["expectations"] == []


def test_resources_rebase_a_restarted_process() -> None:
    rows = [
        {"t_s": t, "name": "b2", "pid": pid, "rss_kib": rss, "fds": 10}
        for t, pid, rss in [(0, 1, 30000), (10, 1, 40000), (20, 1, 40400), (30, 2, 9000),
                            (40, 2, 40000), (50, 2, 40000), (60, 2, 40800)]
    ]  # fmt: skip
    r = chaos.resources(rows, warmup_s=10)["b2"]
    assert r["incarnations"] == 2
    assert [g["growth_pct"] for g in r["rss_growth"]] == [1.0, 2.0]


def test_compose_markdown_and_plot(tmp_path: Path) -> None:
    planned = chaos.plan(60, seed=3, kinds=["reload-config", "stop-backend"])
    out = _steady(0, 60)
    events = [DrillEvent(planned[0].at, "reload", "a+b")]
    done = {
        p.index: {"faulted": "a+b" if p.kind == "reload-config" else "b2",
                  "backend_id": None, "checks": {"reload_applied": True}, "skipped": None}
        for p in planned
    }  # fmt: skip
    procs = [{"t_s": t, "name": "a", "pid": 5, "rss_kib": 50000 + t, "fds": 20}
             for t in range(0, 60, 10)]  # fmt: skip
    report = chaos.compose(
        planned=planned, seed=3, rate=10, duration=60, window=10, outcomes=out,
        events=events, samples=[], procs=procs, done=done,
    )  # fmt: skip
    assert report["summary"]["requests"] == 600 and report["summary"]["errors"] == 0
    assert len(report["windows"]) == 6 and report["windows"][0]["p95_ms"] == 2.0
    md = chaos.to_markdown(report)
    assert "| reload-config |" in md and "## Processes" in md
    png = tmp_path / "c.png"
    chaos.plot(report, str(png))
    assert png.read_bytes()[:4] == b"\x89PNG"


# ---- real runs (short) ---------------------------------------------------------------------

_PIDS = re.compile(r"soak: stack up \((.*)\)")


def _soak(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    err = tmp_path / "stderr.txt"
    with open(err, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loadtest.soak", "--chaos", *args],
            cwd=REPO,
            env=python_env(),
            stdout=subprocess.DEVNULL,
            stderr=f,
        )
    return proc, err


def _pids(err: Path) -> list[int]:
    m = _PIDS.search(err.read_text())
    assert m, err.read_text()[-2000:]
    return [int(x.split("=")[1]) for x in m.group(1).split()]


def _left_namespaces(pid: int) -> list[str]:
    return [n for n in list_namespaces() if n.startswith(f"lbt-{pid}-")]


def test_a_short_real_run_reports_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    proc, err = _soak(
        tmp_path, "--minutes", "0.5", "--rate", "30", "--window", "5", "--json", str(out),
        "--md", str(tmp_path / "c.md"), "--events", "reload-config,kill-backend,delay-backend",
    )  # fmt: skip
    try:
        rc = proc.wait(90)
    finally:
        proc.kill()
    text = err.read_text()
    assert rc == 0, text[-3000:]
    assert "chaos schedule (seed 1, 3 events)" in text
    assert wait_gone(_pids(err), 5.0) == []
    assert _left_namespaces(proc.pid) == []
    report = json.loads(out.read_text())
    assert report["mode"] == "chaos" and report["rate"] == 30
    assert {e["kind"] for e in report["events"]} == {
        "reload-config", "kill-backend", "delay-backend",
    }  # fmt: skip
    for e in report["events"]:
        assert {"kind", "target", "at_s", "failed_in_flight", "failed_new_connections",
                "window", "expectations", "held", "skipped"} <= set(e)  # fmt: skip
        assert e["held"] is True or e["skipped"]
    reload = next(e for e in report["events"] if e["kind"] == "reload-config")
    assert reload["reload_applied"] is True
    s = report["summary"]
    assert s["requests"] == 900 and s["ok"] is True
    assert {"a", "b", "b1", "b2", "b3"} <= set(report["resources"])
    assert report["resources"]["b2"]["incarnations"] == 2  # killed, restarted
    assert (tmp_path / "c.md").read_text().startswith("# Chaos soak")


def test_interrupt_stops_every_child_and_removes_the_namespace(tmp_path: Path) -> None:
    proc, err = _soak(
        tmp_path, "--minutes", "1", "--rate", "20", "--events", "delay-backend,kill-backend",
        "--json", str(tmp_path / "c.json"),
    )  # fmt: skip
    try:
        # interrupted in the middle of the first event (a fault done, its restore pending)
        assert wait_until(lambda: "s] #0 " in err.read_text(), 60, step=0.2), err.read_text()[
            -2000:
        ]
        pids = _pids(err)
        if os.geteuid() == 0:
            assert _left_namespaces(proc.pid)  # b3 runs in its own namespace
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(30)
    finally:
        proc.kill()
    assert rc == 130, err.read_text()[-2000:]
    assert "interrupted" in err.read_text()
    m = re.search(r"workdir (\S+)", err.read_text())
    assert m and not Path(m.group(1)).exists()
    assert wait_gone(pids, 5.0) == []
    assert _left_namespaces(proc.pid) == []


def test_a_killed_soak_leaves_children_that_die_and_a_namespace_that_is_swept(
    tmp_path: Path,
) -> None:
    proc, err = _soak(
        tmp_path, "--minutes", "1", "--rate", "20", "--events", "delay-backend,kill-backend",
        "--json", str(tmp_path / "c.json"),
    )  # fmt: skip
    try:
        assert wait_until(lambda: "soak: stack up" in err.read_text(), 40, step=0.2), (
            err.read_text()[-2000:]
        )
        pids = _pids(err)
    finally:
        proc.kill()  # SIGKILL: the soak cleans nothing itself
        proc.wait(10)
    assert wait_gone(pids, 10.0) == []  # the kernel's parent-death signal stops them
    if os.geteuid() == 0:
        assert _left_namespaces(proc.pid)  # left behind ...
        sweep_stale()  # ... until the next soak (or test) sweeps what dead owners left
        assert _left_namespaces(proc.pid) == []
    m = re.search(r"workdir (\S+)", err.read_text())
    assert m and Path(m.group(1)).name.startswith("lb-chaos-")
    shutil.rmtree(m.group(1), ignore_errors=True)  # what a killed soak could not remove
