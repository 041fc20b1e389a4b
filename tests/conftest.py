"""Fixtures shared by every test directory."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

BUSY_LOOP_S = 120  # each busy loop ends by itself, even if the fixture's kill is never reached
_BUSY_LOOP = (
    "import time\n"
    f"end = time.monotonic() + {BUSY_LOOP_S}\n"
    "while time.monotonic() < end:\n"
    "    pass\n"
)


@pytest.fixture
def cpu_load() -> Iterator[int]:
    """One busy-loop process per core while the test runs (a busy machine makes the process
    under test slow to get back to its event loop); always killed. Yields how many run."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(os.cpu_count() or 1):
            procs.append(subprocess.Popen([sys.executable, "-c", _BUSY_LOOP]))
        yield len(procs)
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(timeout=10)
