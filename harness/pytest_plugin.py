"""The `harness` pytest fixture: child processes for one test, stopped at teardown, their
logs shown when the test failed. Loaded with `-p harness.pytest_plugin` (pyproject addopts):
a tests/conftest.py would put tests/ on sys.path, where tests/backends and friends would
shadow the real packages."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from harness import Harness

_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        item.stash[_FAILED] = True
    return report


@pytest.fixture
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    """`harness.backend("a")`, `harness.balancer(*args)`, `harness.stack()`: see `harness`.

    Every child is stopped at teardown and none may survive it; when the test failed, the
    tail of every child's log is printed (pytest shows it with the failure) and the
    directory is kept (tmp_path_retention_policy = "failed")."""
    h = Harness(tmp_path / "harness")
    yield h
    failed = request.node.stash.get(_FAILED, False)
    left = h.close(failed=failed)
    if failed:
        print(f"harness logs in {h.workdir}:\n{h.logs()}")
    assert not left, f"processes survived the teardown: {left}"
