"""The Balancer's narrow interfaces: admin-state and weight changes, roles, and the layering
rule that nothing in the package imports the wiring module."""

from __future__ import annotations

import ast
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import balancer
from balancer.app import Balancer
from balancer.config import BackendSpec
from balancer.events import Event, EventKind

PACKAGE = Path(balancer.__file__).parent
# port 9 (discard) is never dialled here: no request goes through these balancers
SPECS = [BackendSpec("127.0.0.1", 9), BackendSpec("127.0.0.2", 9)]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, type-only (TYPE_CHECKING) and function-level included."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_module_of_the_package_imports_the_wiring() -> None:
    # __main__ is the process entry point: it alone builds the Balancer
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path not in (PACKAGE / "__main__.py", PACKAGE / "app.py")
        and {"balancer.app", "balancer.app.Balancer"} & imported_modules(path)
    ]
    assert offenders == []


def test_the_import_scan_sees_type_only_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import balancer.app\n"
    )
    assert "balancer.app" in imported_modules(module)


async def test_set_admin_state_changes_eligibility_and_emits_once(
    start_balancer: Callable[..., Awaitable[Balancer]],
) -> None:
    bal = await start_balancer(SPECS)
    seen: list[Event] = []
    bal.subscribe(seen.append)
    first = "127.0.0.1:9"
    assert bal.set_admin_state(first, "maint", "by test") == "maint"
    assert [b.id for b in bal.cluster.eligible(bal.clock())] == ["127.0.0.2:9"]
    assert [(e.kind, e.backend, e.detail) for e in seen] == [
        (EventKind.MAINT, first, "by test (enabled -> maint)")
    ]
    assert bal.set_admin_state(first, "enabled", "by test") == "up"
    assert len(bal.cluster.eligible(bal.clock())) == 2
    assert seen[-1].kind == EventKind.ENABLE
    bal.unsubscribe(seen.append)
    bal.set_admin_state(first, "draining", "by test")
    assert len(seen) == 2  # unsubscribed
    assert bal.events[-1].kind == EventKind.DRAIN
    with pytest.raises(KeyError):
        bal.set_admin_state("10.9.9.9:1", "maint", "by test")


async def test_set_weight_and_algorithm_emit_only_real_changes(
    start_balancer: Callable[..., Awaitable[Balancer]],
) -> None:
    bal = await start_balancer(SPECS)
    seen: list[Any] = []
    bal.subscribe(lambda e: seen.append((e.kind, e.backend, e.detail)))
    bal.set_weight("127.0.0.2:9", 3, "by test")
    assert bal.cluster.backends["127.0.0.2:9"].configured_weight == 3
    bal.set_algorithm(bal.cluster.algorithm)  # unchanged: no event
    bal.set_algorithm("least-connections")
    assert seen == [
        (EventKind.WEIGHT, "127.0.0.2:9", "by test (1 -> 3)"),
        (EventKind.ALGORITHM, "", "least-connections"),
    ]
    with pytest.raises(KeyError):
        bal.set_weight("10.9.9.9:1", 2, "by test")


async def test_a_reported_role_is_shown_and_announced(
    start_balancer: Callable[..., Awaitable[Balancer]], pair_status: Callable[..., Any]
) -> None:
    bal = await start_balancer(SPECS)
    assert bal.role == "standalone"
    bal.report_role("active", "test")
    bal.pair = pair_status({"transitions": 1})  # type: ignore[assignment]
    state = bal.state_view()
    assert (state["role"], state["role_detail"]) == ("active", {"transitions": 1})
    assert (bal.events[-1].kind, bal.events[-1].detail) == (
        EventKind.ROLE,
        "standalone -> active: test",
    )


async def test_a_reload_that_moves_the_access_log_closes_the_old_file(
    tmp_path: Path, start_balancer: Callable[..., Awaitable[Balancer]]
) -> None:
    from dataclasses import replace

    first, second = tmp_path / "one.log", tmp_path / "two.log"
    bal = await start_balancer(SPECS, access_log=str(first))
    old = bal.access_log
    assert old is not None and not old.out.closed
    result = bal.apply(replace(bal.cfg, access_log=str(second)))
    assert "access_log" in result.applied
    assert old.out.closed  # no file handle leaks per reload
    assert bal.ctx.access_log is bal.access_log and bal.access_log is not None
    assert bal.access_log.target == str(second)
