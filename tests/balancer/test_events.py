"""Event kinds: the dashboard lists exactly the kinds the balancer emits."""

from __future__ import annotations

import re
from pathlib import Path

import balancer
from balancer.events import Event, EventKind

APP_JS = Path(balancer.__file__).parent / "admin" / "static" / "app.js"


def dashboard_kinds() -> set[str]:
    """The keys of app.js's EVENT_CLASS table (bare or quoted)."""
    match = re.search(r"const EVENT_CLASS = \{(.*?)\};", APP_JS.read_text(), re.S)
    assert match is not None, "EVENT_CLASS not found in app.js"
    body = re.sub(r"//[^\n]*", "", match.group(1))
    return set(re.findall(r"""(?:^|,)\s*"?([\w-]+)"?\s*:""", body))


def test_dashboard_lists_exactly_the_event_kinds() -> None:
    assert dashboard_kinds() == {str(k) for k in EventKind}


def test_dashboard_kinds_parser_sees_quoted_and_bare_keys() -> None:
    kinds = dashboard_kinds()
    assert {"pool-mode", "reload-refused", "ejected"} <= kinds
    assert "failed" not in kinds  # listed once but never emitted


def test_event_serialises_the_kind_as_its_plain_string() -> None:
    event = Event(1.5, EventKind.POOL_MODE, "", "normal -> panic")
    as_dict = event.as_dict()
    assert as_dict == {"ts": 1.5, "kind": "pool-mode", "backend": "", "detail": "normal -> panic"}
    assert type(as_dict["kind"]) is str
