"""Drill expectations: conditions on the report, Chaos Toolkit's steady-state hypothesis.

A condition is `KEY OP VALUE`, for example `failed_requests==0`, `failover_s<=1.0`,
`recover_s!=null`, `latency.after.p99_ms<50`:

- KEY: a report key, or a dotted path into it (`counts.failed`, `latency.after.failed`).
- OP: one of == != <= >= < >.
- VALUE: a number, `null`, `true` or `false`.

A measured null (nothing measured) satisfies `==null` and `!=VALUE` only: it is never
`<=` or `>` anything. Order comparisons need a number on both sides. Conditions are parsed
here with a regular expression, never evaluated as Python.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

OPS = ("==", "!=", "<=", ">=", "<", ">")  # two-character operators first
# top-level report keys a condition may start with (checked before the drill runs)
KNOWN_KEYS = frozenset(
    {
        "failed_requests",
        "failed_in_flight",
        "failed_new_connections",
        "detect_s",
        "recover_s",
        "failover_s",
        "disrupted",
        "active_changed",
        "takeover_s",
        "counts",
        "latency",
        "per_backend",
        "added_s",
        "removed_s",
        "served_by_added",
        "state_samples",
        # the chaos soak's checks of one event (loadtest/chaos.py)
        "serial_changed",
        "reload_applied",
        "delay_applied",
        "delay_cleared",
        "restart_ready",
    }
)
_CONDITION = re.compile(
    r"^\s*(?P<key>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_-]+)*)\s*"
    r"(?P<op>==|!=|<=|>=|<|>)\s*(?P<value>\S+)\s*$"
)
_NUMBER = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$")
_MISSING = object()


class ExpectError(ValueError):
    """A condition that does not parse; the message is one line for the user."""


Value = float | bool | None


@dataclass(frozen=True)
class Expectation:
    key: str
    op: str
    value: Value
    text: str  # the condition as normalised: `failover_s<=1.0`

    def holds(self, measured: Any) -> bool:
        if measured is _MISSING:
            return False
        if self.op in ("==", "!="):
            same = _same(measured, self.value)
            return same if self.op == "==" else not same
        if not (_is_number(measured) and _is_number(self.value)):
            return False  # null or a bool is not ordered
        m, v = float(measured), float(self.value)  # type: ignore[arg-type]
        return {"<=": m <= v, ">=": m >= v, "<": m < v, ">": m > v}[self.op]


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _same(measured: Any, value: Value) -> bool:
    if value is None or isinstance(value, bool):
        return measured is value
    return _is_number(measured) and float(measured) == value


def _value_text(v: Value) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def parse(text: str) -> Expectation:
    m = _CONDITION.match(text)
    if m is None:
        raise ExpectError(
            f"bad --expect {text!r}: want KEY OP VALUE, OP one of {' '.join(OPS)}, "
            "e.g. failed_requests==0"
        )
    key, op, raw = m["key"], m["op"], m["value"]
    if key.split(".")[0] not in KNOWN_KEYS:
        raise ExpectError(
            f"bad --expect {text!r}: unknown key {key.split('.')[0]!r} "
            f"(known: {', '.join(sorted(KNOWN_KEYS))})"
        )
    value: Value
    if raw in ("null", "none", "None"):
        value = None
    elif raw in ("true", "false"):
        value = raw == "true"
    elif _NUMBER.match(raw):
        value = float(raw)
        if not math.isfinite(value):
            raise ExpectError(f"bad --expect {text!r}: {raw} is not a finite number")
    else:
        raise ExpectError(f"bad --expect {text!r}: value {raw!r} is not a number, null or bool")
    if op not in ("==", "!=") and not isinstance(value, float):
        raise ExpectError(f"bad --expect {text!r}: {op} needs a number")
    return Expectation(key, op, value, f"{key}{op}{_value_text(value)}")


def parse_all(texts: Iterable[str]) -> list[Expectation]:
    return [parse(t) for t in texts]


def lookup(report: dict[str, Any], key: str) -> Any:
    """The value at a dotted key, or a private marker when any part is missing."""
    node: Any = report
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def evaluate(report: dict[str, Any], expectations: Iterable[Expectation]) -> list[dict[str, Any]]:
    """One row per condition: the condition, the measured value ("missing" when the report
    has no such key) and whether it holds."""
    rows = []
    for e in expectations:
        measured = lookup(report, e.key)
        rows.append(
            {
                "condition": e.text,
                "measured": "missing" if measured is _MISSING else measured,
                "ok": e.holds(measured),
            }
        )
    return rows
