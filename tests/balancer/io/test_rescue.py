"""A hung backend's in-flight requests are retried elsewhere once it is declared down."""

from __future__ import annotations

import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from harness import BackendProc, BalancerProc, wait_until


def test_requests_stuck_on_a_paused_backend_move_to_another(
    backend: Callable[..., BackendProc], balancer: Callable[..., BalancerProc]
) -> None:
    good, hung = backend("good"), backend("hung")
    # a response timeout far beyond the test's waits: only the rescue can answer in time
    lb = balancer(
        *("--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"),
        *("--backend", good.address, "--backend", hung.address),
        *("--timeout-backend-response", "300"),
    )
    assert wait_until(lambda: {b["state"] for b in lb.backends().values()} == {"up"}, 15.0), (
        lb.backends()
    )
    hung.signal(signal.SIGSTOP)

    def get(_: int) -> tuple[int, str | None]:
        # a hang guard, not a timing bound: far below the response timeout, far above the
        # time the health checks need to declare the backend down
        ans = lb.get("/", timeout=60.0)
        return ans.status, ans.headers["X-Backend"]

    # round robin sends about half of these to the paused backend
    with ThreadPoolExecutor(8) as workers:
        results = list(workers.map(get, range(8)))
    assert results == [(200, "good")] * 8
    events = lb.state()["events"]
    assert {"kind": "down", "backend": hung.address} in [
        {"kind": e["kind"], "backend": e["backend"]} for e in events
    ]
    rescued = [e for e in events if e["kind"] == "rescued"]
    assert [e["backend"] for e in rescued] == [hung.address], events
    hung.signal(signal.SIGCONT)
