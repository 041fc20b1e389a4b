"""loadtest.blocking's summary and table (the runs themselves are the README experiment)."""

from __future__ import annotations

import pytest

from harness.traffic import Outcome
from loadtest.blocking import format_rows, parse_args, summarise


def _ok(backend: str, ms: float) -> Outcome:
    return Outcome(0.0, ms / 1000, 200, None, backend)


def test_summary_counts_shares_of_answered_requests_and_latency() -> None:
    outcomes = [_ok("b1", 2), _ok("b2", 3), _ok("b3", 40), _ok("b3", 60)]
    outcomes.append(Outcome(0.0, None, None, "timeout", None))
    s = summarise(outcomes, duration=2.0)
    assert (s["sent"], s["ok"], s["errors"], s["throughput_rps"]) == (5, 4, 1, 2.0)
    assert s["share"] == {"b1": 0.25, "b2": 0.25, "b3": 0.5}
    assert s["p50_ms"] == 3.0 and s["p99_ms"] == 60.0
    text = format_rows([{"kind": "blocking", "algorithm": "round-robin", "summary": s}])
    assert text.splitlines()[1].split() == [
        "blocking", "round-robin", "2", "3.0", "60.0", "1", "25%", "25%", "50%",
    ]  # fmt: skip


def test_nothing_answered_is_an_empty_share() -> None:
    s = summarise([Outcome(0.0, None, None, "refused", None)], duration=1.0)
    assert s["share"] == {} and s["p50_ms"] is None and s["throughput_rps"] == 0.0


@pytest.mark.parametrize("args", [["--slow-ms", "0"], ["--rate", "x"], ["--duration", "1e9"]])
def test_bad_arguments_exit_2(args: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(args)
    assert exc.value.code == 2
