"""`--workers 2`: what each worker counts or sees reaches `/api/state` and `/metrics` as
one total: the retry budget's allowed and refused retries, the outlier ejections that the
workers' failures add up to, and the requests a worker rescued off a backend gone down."""

from __future__ import annotations

import re
import signal
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from harness import BackendProc, BalancerProc, wait_until

WORKERS = ("--workers", "2")


def free_port() -> int:
    """A loopback port nothing listens on (connects to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "lb.toml"
    path.write_text(text)
    return str(path)


def metric(body: str, name: str) -> float:
    """The value of one sample line (`name` includes its labels)."""
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def start(balancer: Callable[..., BalancerProc], backends: list[str], *args: str) -> BalancerProc:
    lb = balancer(
        *("--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", *WORKERS),
        *(a for b in backends for a in ("--backend", b)),
        *args,
    )
    assert wait_until(
        lambda: len(w := lb.state()["workers"]) == 2 and all(r["listening"] for r in w), 10
    ), lb.state()["workers"]
    return lb


def settled(
    lb: BalancerProc, sent: int, also: Callable[[dict[str, Any]], bool] = lambda s: True
) -> dict[str, Any]:
    """/api/state once both workers' reports include every request sent and `also` holds
    (they report every 0.1 s; a request is counted when it arrives, its retries later);
    both workers must have served some, or nothing was summed."""
    box: dict[str, Any] = {}

    def done() -> bool:
        box["state"] = state = lb.state()
        served = [w["requests"] for w in state["workers"]]
        return sum(served) == sent and all(served) and also(state)

    assert wait_until(done, 5), box.get("state")
    state: dict[str, Any] = box["state"]
    return state


def test_retries_and_ejections_are_totals_over_the_workers(
    tmp_path: Path, backend: Callable[..., BackendProc], balancer: Callable[..., BalancerProc]
) -> None:
    good = backend("good")
    dead = f"127.0.0.1:{free_port()}"
    # no active checks: only the passive ones (outlier detection) take `dead` out, after 6
    # connect failures in a row, counted by the supervisor over both workers
    cfg = config(tmp_path, "[outlier]\nconsecutive_failures = 6\n")
    lb = start(balancer, [good.address, dead], "--no-checks", "--config", cfg)
    sent = 40
    answers = [lb.get("/").status for _ in range(sent)]  # fresh connections: both workers
    assert answers == [200] * sent  # each failed attempt was retried on `good`
    state = settled(lb, sent)
    rows = {b["id"]: b for b in state["backends"]}
    retried = sum(b["retries"] for b in rows.values())
    assert retried == rows[dead]["errors"]["connect"] > 0, rows
    assert state["retry_budget"] == {"allowed": retried, "refused": 0}
    assert rows[dead]["ejections"] == 1 and rows[dead]["state"] == "ejected", rows[dead]
    assert [e["backend"] for e in state["events"] if e["kind"] == "ejected"] == [dead]
    body = lb.admin("/metrics").body.decode()
    assert metric(body, 'lb_retry_budget_retries_total{outcome="allowed"}') == retried
    assert metric(body, 'lb_retry_budget_retries_total{outcome="refused"}') == 0
    assert metric(body, f'lb_backend_ejections_total{{backend="{dead}"}}') == 1


def test_refused_retries_are_a_total_over_the_workers(
    tmp_path: Path, backend: Callable[..., BackendProc], balancer: Callable[..., BalancerProc]
) -> None:
    good = backend("good")
    dead = f"127.0.0.1:{free_port()}"
    # an empty retry budget refuses every retry; no ejection takes `dead` out meanwhile
    cfg = config(
        tmp_path,
        "[retries]\nbudget_ratio = 0\nbudget_min_per_second = 0\n"
        "[outlier]\nconsecutive_failures = 1000\n",
    )
    lb = start(balancer, [good.address, dead], "--no-checks", "--config", cfg)
    sent = 30
    answers = [lb.get("/").status for _ in range(sent)]
    failed = answers.count(502)  # the first attempt went to `dead`, no retry allowed
    assert failed > 0 and failed + answers.count(200) == sent, answers
    state = settled(lb, sent, lambda s: bool(s["retry_budget"]["refused"] == failed))
    assert state["retry_budget"] == {"allowed": 0, "refused": failed}
    body = lb.admin("/metrics").body.decode()
    assert metric(body, 'lb_retry_budget_retries_total{outcome="refused"}') == failed


def test_requests_a_worker_rescues_show_on_the_timeline(
    backend: Callable[..., BackendProc], balancer: Callable[..., BalancerProc]
) -> None:
    good, hung = backend("good"), backend("hung")
    # a response timeout far beyond the test's waits: only the rescue can answer in time
    lb = start(balancer, [good.address, hung.address], "--timeout-backend-response", "300")
    assert wait_until(lambda: {b["state"] for b in lb.backends().values()} == {"up"}, 15.0)
    hung.signal(signal.SIGSTOP)

    def get(_: int) -> int:
        # a hang guard far above the time the checks need to declare `hung` down
        return lb.get("/", timeout=60.0).status

    try:
        with ThreadPoolExecutor(12) as pool:  # round robin: some stick on `hung` in each worker
            results = list(pool.map(get, range(12)))
    finally:
        hung.signal(signal.SIGCONT)
    assert results == [200] * 12
    state = settled(lb, 12)
    rescued = [e for e in state["events"] if e["kind"] == "rescued"]
    assert rescued and {e["backend"] for e in rescued} == {hung.address}, state["events"]
    moved = 0
    for e in rescued:
        m = re.fullmatch(r"worker [01]: (\d+) in-flight request\(s\) moved off it", e["detail"])
        assert m, e
        moved += int(m.group(1))

    # every request that sat on `hung` was moved by the worker holding it, and counted once
    # as a failed attempt there (in the worker's next report)
    def counted() -> bool:
        row = lb.backends()[hung.address]
        return bool(row["errors"]["response"] == moved == row["requests"] and not row["in_flight"])

    assert moved > 0 and wait_until(counted, 3), (rescued, lb.backends()[hung.address])
