"""--expect: parsing, evaluation on hand-built reports, defaults and the command line."""

from __future__ import annotations

from typing import Any

import pytest

from loadtest import drill
from loadtest.drill import build_parser, default_expectations, expectations_for
from loadtest.expect import ExpectError, evaluate, parse, parse_all
from loadtest.targets import SCENARIOS

REPORT: dict[str, Any] = {
    "failed_requests": 3,
    "failed_new_connections": 0,
    "failover_s": 0.62,
    "recover_s": None,
    "active_changed": True,
    "latency": {"after": {"failed": 0, "p99_ms": 12.5}},
}


def check(condition: str) -> bool:
    (row,) = evaluate(REPORT, [parse(condition)])
    return bool(row["ok"])


@pytest.mark.parametrize(
    ("text", "key", "op", "value", "normal"),
    [
        ("failed_requests==0", "failed_requests", "==", 0.0, "failed_requests==0"),
        (" failover_s <= 1.0 ", "failover_s", "<=", 1.0, "failover_s<=1"),
        ("recover_s!=null", "recover_s", "!=", None, "recover_s!=null"),
        ("active_changed==true", "active_changed", "==", True, "active_changed==true"),
        ("latency.after.p99_ms<2e1", "latency.after.p99_ms", "<", 20.0, "latency.after.p99_ms<20"),
        ("detect_s>-.5", "detect_s", ">", -0.5, "detect_s>-0.5"),
    ],
)
def test_parse(text: str, key: str, op: str, value: object, normal: str) -> None:
    e = parse(text)
    assert (e.key, e.op, e.value, e.text) == (key, op, value, normal)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("failed_requests", "want KEY OP VALUE"),
        ("failed_requests=0", "want KEY OP VALUE"),
        ("failed_requests=>0", "want KEY OP VALUE"),
        ("__import__('os')==0", "want KEY OP VALUE"),
        ("failed_request==0", "unknown key 'failed_request'"),
        ("failover_s<=fast", "is not a number, null or bool"),
        ("failover_s<=null", "<= needs a number"),
        ("failover_s<=inf", "is not a number"),
        ("failed_requests==0 or 1", "want KEY OP VALUE"),
    ],
)
def test_bad_conditions_are_one_line_errors(text: str, says: str) -> None:
    with pytest.raises(ExpectError, match=says) as info:
        parse(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("condition", "holds"),
    [
        ("failed_requests==3", True),
        ("failed_requests==0", False),
        ("failed_requests<=3", True),
        ("failed_requests<3", False),
        ("failed_new_connections==0", True),
        ("failover_s<=1.0", True),
        ("failover_s>1", False),
        ("recover_s==null", True),
        ("recover_s!=null", False),
        ("recover_s<=10", False),  # null is never ordered
        ("recover_s>=0", False),
        ("active_changed==true", True),
        ("active_changed==1", False),  # a bool is not a number
        ("active_changed>0", False),
        ("latency.after.failed==0", True),
        ("latency.after.p99_ms<12.5", False),
        ("detect_s==null", False),  # missing from the report: never holds
        ("latency.during.failed==0", False),
    ],
)
def test_evaluate(condition: str, holds: bool) -> None:
    assert check(condition) is holds


def test_evaluate_rows_carry_the_measured_value() -> None:
    rows = evaluate(REPORT, parse_all(["failover_s<=0.5", "detect_s==null", "recover_s==null"]))
    assert rows == [
        {"condition": "failover_s<=0.5", "measured": 0.62, "ok": False},
        {"condition": "detect_s==null", "measured": "missing", "ok": False},
        {"condition": "recover_s==null", "measured": None, "ok": True},
    ]


def test_every_scenario_has_defaults_that_parse() -> None:
    for name in SCENARIOS:
        for target in ("local", "docker"):
            assert parse_all(default_expectations(name, target)), (name, target)
    assert "failed_new_connections==0" in default_expectations("kill-active-balancer", "docker")
    assert "failed_new_connections==0" not in default_expectations("kill-active-balancer", "local")
    assert "failed_requests==0" in default_expectations("stop-backend", "local")
    assert "failed_requests==0" in default_expectations("stop-backend", "docker")


def texts(argv: list[str]) -> list[str]:
    return [e.text for e in expectations_for(build_parser().parse_args(argv))]


def test_expectations_from_the_command_line() -> None:
    base = ["--json", "x.json"]
    assert texts(["stop-backend", "--local", *base]) == ["failed_requests==0", "recover_s!=null"]
    assert texts(["kill-active-balancer", *base, "--expect", "failover_s<=1.0"]) == [
        "active_changed==true",
        "failed_new_connections==0",
        "failover_s<=1",
    ]
    argv = ["kill-backend", "--no-expect", "--max-failed", "2", "--expect", "detect_s!=null"]
    assert texts([*argv, *base]) == ["failed_requests<=2", "detect_s!=null"]
    help_text = build_parser().format_help()
    assert "stop-backend" in help_text and "failed_new_connections==0" in help_text


def test_bad_expect_exits_2_before_anything_runs(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["kill-backend", "--local", "--json", "x.json", "--expect", "failed==0"]
    assert drill.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("drill: bad --expect 'failed==0': unknown key 'failed'")
    assert err.count("\n") == 1
