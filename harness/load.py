"""Background load for tests: a closed-loop client thread bounded in time and count, and
busy-loop CPU load."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

from harness.http import IO_TIMEOUT

T = TypeVar("T")

# one request: (HTTP status, what to record of the response, e.g. X-Backend or a serial)
Request = Callable[[], tuple[int, T]]


class LoadLoop(Generic[T]):
    """Call `request()` back to back in a thread until `duration` is over, `max_requests`
    were sent or `stop()`; record the 200s' values in order and every failure.

        with LoadLoop(lambda: get_backend(port), duration=3.0) as load:
            ...              # change something under load
            load.wait()      # let it run to the end
        assert load.failures == []
    """

    def __init__(self, request: Request[T], duration: float, max_requests: int = 100_000) -> None:
        self.request = request
        self.duration = duration
        self.max_requests = max_requests
        self.ok = 0
        self.values: list[T] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="LoadLoop", daemon=True)

    def __enter__(self) -> LoadLoop[T]:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        end = time.monotonic() + self.duration
        for _ in range(self.max_requests):
            if time.monotonic() >= end or self._stop.is_set():
                return
            try:
                status, value = self.request()
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            if status == 200:
                self.ok += 1
                self.values.append(value)
            else:
                self.failures.append(f"HTTP {status}")

    @property
    def sent(self) -> int:
        """Requests that got an answer or an error so far."""
        return self.ok + len(self.failures)

    def seen_since(self, mark: int) -> set[T]:
        """The distinct values recorded after the first `mark` ones."""
        return set(self.values[mark:])

    def changes(self) -> list[T]:
        """The values with consecutive repeats collapsed: [a, a, b, b, a] -> [a, b, a]."""
        out: list[T] = []
        for v in self.values:
            if not out or out[-1] != v:
                out.append(v)
        return out

    def wait(self) -> None:
        """Let the loop run to its end; fails if it does not end in time."""
        self._thread.join(self.duration + 2 * IO_TIMEOUT)
        assert not self._thread.is_alive(), "the load loop did not end"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.duration + 2 * IO_TIMEOUT)


_BUSY_LOOP = (
    "import sys, time\n"
    "end = time.monotonic() + float(sys.argv[1])\n"
    "while time.monotonic() < end:\n"
    "    pass\n"
)


@contextmanager
def cpu_load(seconds: float = 120.0, processes: int | None = None) -> Iterator[int]:
    """Keep the machine busy: one busy-loop process per core (or `processes`) while the block
    runs, as on a loaded CI machine. Each loop also ends by itself after `seconds`; the block
    always kills them. Yields how many run."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(processes or os.cpu_count() or 1):
            procs.append(subprocess.Popen([sys.executable, "-c", _BUSY_LOOP, str(seconds)]))
        yield len(procs)
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
