"""The network drills: the impairment each scenario makes, the report's `backends` field
from /api/connections samples, a drill whose impairment failed, and (root) a real drill's
namespace and impairment swept after the drill was SIGKILLed. (loadtest.netem's set-up
and clean-up, with and without sch_netem, are tested in tests/harness/test_netns.py and
tests/loadtest/test_nfq_*.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.netns import list_links, list_namespaces, sweep_stale
from harness.procs import REPO, python_env
from harness.traffic import Outcome
from loadtest.drill import main, run_drill
from loadtest.netdrill import TcpPoint, impairment_for, points_from, tcp_backends
from loadtest.netem import Impairment, NetemUnavailable
from loadtest.targets import SCENARIOS, DrillError, Scenario, Target

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "tc", "iptables")),
    reason="needs root with ip, tc (iproute2) and iptables (the no-netem fallback)",
)


def test_each_scenario_makes_its_impairment() -> None:
    assert impairment_for("delay-backend", delay_ms=80, jitter_ms=5) == Impairment(80, 5)
    assert impairment_for("loss-backend") == Impairment(loss_pct=5.0)
    assert impairment_for("bandwidth-backend", rate_kbit=256) == Impairment(rate_kbit=256)
    for name in ("delay-backend", "loss-backend", "bandwidth-backend"):
        assert (SCENARIOS[name].fault, SCENARIOS[name].restore) == ("netem", "clear")
    with pytest.raises(ValueError, match="loss_pct"):
        impairment_for("loss-backend", loss_pct=150)


def test_a_bad_impairment_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["loss-backend", "--local", "--loss-pct", "-3", "--json", "/dev/null"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("drill: netem:")


BODY = {
    "connections": [
        {"side": "client", "backend": None, "rtt_ms": 0.1, "cwnd": 10},
        {"side": "backend", "backend": "b1", "rtt_ms": 1.0, "cwnd": 10},
        {"side": "backend", "backend": "b2", "rtt_ms": 50.0, "cwnd": 4},
        {"side": "backend", "backend": "b2", "rtt_ms": 60.0, "cwnd": 2},
        {"side": "backend", "backend": "b2", "rtt_ms": 70.0, "cwnd": 3, "idle_ms": 10},
        {"side": "backend", "backend": "b2", "rtt_ms": 900.0, "cwnd": 50, "idle_ms": 9000},
    ],
    "backends": {"b1": {"retransmits": 0}, "b2": {"retransmits": 7}, "b3": {"retransmits": 1}},
}


def test_points_per_backend_from_one_answer() -> None:
    pts = {p.backend: p for p in points_from(5.0, BODY)}
    assert pts["b2"] == TcpPoint(5.0, "b2", 3, 60.0, 3.0, 7)  # the idle one left out
    assert pts["b1"].rtt_ms == 1.0 and pts["b1"].connections == 1
    assert pts["b3"] == TcpPoint(5.0, "b3", 0, None, None, 1)  # no open connection now


def _ok(t: float, backend: str) -> Outcome:
    return Outcome(t, 0.001, 200, None, backend)


def test_report_backends_by_phase() -> None:
    t0 = 100.0
    points = [
        TcpPoint(t0 + 1, "b2", 1, 1.0, 10.0, 0),
        TcpPoint(t0 + 2, "b2", 1, 1.0, 10.0, 0),
        TcpPoint(t0 + 4, "b2", 1, 55.0, 2.0, 6),  # during: RTT up, cwnd down, retransmits
        TcpPoint(t0 + 5, "b2", 1, 65.0, 3.0, 9),
        TcpPoint(t0 + 7, "b2", 1, 1.0, 8.0, 9),
    ]
    outcomes = [_ok(t0 + t, b) for t in (0.5, 1, 1.5, 2) for b in ("b1", "b2")]
    outcomes += [_ok(t0 + t, "b1") for t in (3.5, 4, 4.5)] + [_ok(t0 + 5, "b2")]
    outcomes += [_ok(t0 + 7, b) for b in ("b1", "b2")]
    got = tcp_backends(points, outcomes, t0=t0, t_fault=3.0, t_restore=6.0)
    b2 = got["b2"]
    assert b2["rtt_ms"] == {"before": 1.0, "during": 60.0, "after": 1.0}
    assert b2["retransmits"] == {"before": 0, "during": 9, "after": 0}
    assert b2["share"] == {"before": 0.5, "during": 0.25, "after": 0.5}
    assert b2["cwnd"] == [[1.0, 10.0], [2.0, 10.0], [4.0, 2.0], [5.0, 3.0], [7.0, 8.0]]
    assert got["b1"]["share"]["during"] == 0.75 and got["b1"]["rtt_ms"]["during"] is None


def _left(pid: int) -> list[str]:
    return [n for n in list_namespaces() if n.startswith(f"lbt-{pid}-")] + [
        link for link in list_links() if link.startswith(f"lv{pid}h")
    ]


@pytest.mark.netns
@needs_root
def test_a_killed_drill_leaves_nothing_once_swept(tmp_path: Path) -> None:
    err = tmp_path / "drill.err"
    with err.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loadtest.drill", "loss-backend", "--local", "--rate", "20",
             "--duration", "60", "--fault-at", "1", "--restore-at", "59",
             "--json", str(tmp_path / "d.json")],
            cwd=REPO, env=python_env(), stdout=subprocess.DEVNULL, stderr=sink,
        )  # fmt: skip
    try:
        for _ in range(300):  # bounded: 30 s for the stack and the impairment
            if "loss-backend" in err.read_text() and " netem b2:" in err.read_text():
                break
            time.sleep(0.1)
        text = err.read_text()
        assert " netem b2: loss 5%" in text, text[-2000:]  # netem, or nfqueue/iptables/tbf
        ns = [n for n in list_namespaces() if n.startswith(f"lbt-{proc.pid}-")]
        assert len(ns) == 1
    finally:
        proc.send_signal(signal.SIGKILL)  # the drill cleans nothing itself
        proc.wait(10)
    assert _left(proc.pid)  # left behind ...
    sweep_stale()  # ... until the next drill, soak or test sweeps what dead owners left
    assert _left(proc.pid) == []  # the namespace took its qdisc or rules with it


class _NoNetemTarget(Target):
    """A target whose impairment fails, as in a container on a kernel without sch_netem."""

    name = "fake"
    service_url = "http://127.0.0.1:9/"  # discard port: every request fails fast

    def setup(self, scenario: Scenario) -> None: ...

    def prepare(self) -> None: ...

    def teardown(self) -> None: ...

    def admin_urls(self) -> dict[str, str]:
        return {}

    def backend_names(self) -> list[str]:
        return ["b1", "b2"]

    def backend_id(self, name: str) -> str:
        return name

    def act(self, kind: str, name: str, action: str) -> str:
        raise NetemUnavailable("the kernel has no netem qdisc (sch_netem)")


async def test_a_drill_whose_impairment_failed_stops_with_one_line() -> None:
    scenario = SCENARIOS["loss-backend"]
    with pytest.raises(DrillError, match=r"impairment was not applied .*sch_netem"):
        await run_drill(
            _NoNetemTarget(), scenario, rate=10, duration=1.0, fault_at=0.1, restore_at=0.5,
            timeout=0.5, progress=False,
        )  # fmt: skip
