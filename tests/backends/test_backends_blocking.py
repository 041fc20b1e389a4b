"""`--blocking-ms`: the demo backend blocks its event loop per request, so concurrent
requests are served one after another. (That `--delay-ms` overlaps them is an upper bound
on time, which a loaded machine can break: the README experiment shows it, not a test.)"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from backends.cli import main
from harness import Harness
from harness.http import request

SLOW_MS = 300


def _two_at_once(host: str, port: int) -> float:
    """Seconds until both of two concurrent requests are answered."""
    start = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: request(host, port, "/", timeout=10), range(2)))
    assert [a.status for a in answers] == [200, 200]
    return time.monotonic() - start


def test_blocking_serialises_concurrent_requests(harness: Harness) -> None:
    blocking = harness.backend("blocker", extra_args=["--blocking-ms", str(SLOW_MS)])
    # a lower bound only: two blocks of 300 ms in one thread cannot both end before 600 ms
    assert _two_at_once(blocking.host, blocking.port) >= 2 * SLOW_MS / 1000


@pytest.mark.parametrize("value", ["-1", "5001", "x"])
def test_bad_blocking_values_are_one_line(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--port", "0", "--name", "a", "--blocking-ms", value])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--blocking-ms" in lines[0]
