"""The compose stack, brought up once per test module from a clean engine and removed after.

Every test under tests/e2e gets the `docker` marker and is skipped, with the reason, when
no engine answers `docker info`, Compose or make is missing, or project `lbtestbed`
already has containers/networks/volumes (someone's stack: we never tear down theirs).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_stack import (
    BACKENDS,
    ENV,
    HERE,
    READY_TIMEOUT_S,
    ROOT,
    UP_TIMEOUT_S,
    Stack,
    all_backends_up,
    healthy_pair,
    leftovers,
    run_cmd,
    skip_reason,
    tail,
    wait_for,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ours = [item for item in items if HERE in Path(str(item.path)).parents]
    if not ours:
        return
    reason = skip_reason()
    for item in ours:
        item.add_marker(pytest.mark.docker)
        # the first test also pays for `make up` (and, cold, the image builds)
        item.add_marker(pytest.mark.timeout(UP_TIMEOUT_S + 300))
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


# ---- the session stack ---------------------------------------------------------------------


# module scope: the stack is removed right after test_stack.py, not at the end of `make test`
@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    pki = ROOT / "pki"
    ca = pki / "ca.crt"
    had_pki = pki.exists()
    old_ca = ca.read_bytes() if ca.exists() else None
    try:
        p = run_cmd(["make", "up"], UP_TIMEOUT_S)
        if p.returncode != 0:
            pytest.fail(f"`make up` failed (exit {p.returncode}):\n{tail(p)}")
        wait_for("both balancers healthy, one active", healthy_pair, READY_TIMEOUT_S)
        wait_for(f"{BACKENDS} backends up", all_backends_up, READY_TIMEOUT_S)
        p = run_cmd(["make", "ca-cert"], 120)
        if p.returncode != 0 or not ca.exists():
            pytest.fail(f"`make ca-cert` failed (exit {p.returncode}):\n{tail(p)}")
        yield Stack(ROOT, ca, ENV)
    finally:
        down = run_cmd(["make", "down", "V=1"], 300)
        # pki/ca.crt belonged to the stack just removed: put back what was there before
        if old_ca is not None:
            ca.write_bytes(old_ca)
        else:
            ca.unlink(missing_ok=True)
            if not had_pki and pki.is_dir() and not any(pki.iterdir()):
                pki.rmdir()
        left = leftovers()
        assert down.returncode == 0, f"`make down V=1` failed:\n{tail(down)}"
        assert not left, f"left behind after `make down V=1`: {left}"
