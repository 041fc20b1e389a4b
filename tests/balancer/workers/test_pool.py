"""The supervisor's pushes without worker processes: an ejection expiring raises no event,
so the pool times one push for the moment it ends, instead of polling for it."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from typing import Any

from balancer.config import BackendSpec, Config, OutlierSettings, RetrySettings, from_args
from balancer.events import Event, EventKind
from balancer.http1.exchange import ListenerStats
from balancer.io.lab import Lab
from balancer.lab.table import ConnTable
from balancer.lb.cluster import Cluster
from balancer.workers.supervisor import WorkerPool

SPECS = [BackendSpec("127.0.0.1", 9001 + i, name=f"b{i + 1}") for i in range(3)]


class Host:
    """What WorkerPool needs of the supervising Balancer, nothing started."""

    def __init__(self, cluster: Cluster) -> None:
        self.cfg: Config = from_args(["--backend", "127.0.0.1:9001"])
        self.cluster = cluster
        self.tls_stores: dict[bool, Any] = {}
        self._stats = ListenerStats()
        self.lab = Lab(ConnTable(lambda: 0.0), set, set)

    @property
    def stats(self) -> ListenerStats:
        return self._stats

    def emit(self, kind: EventKind, backend: str, detail: str) -> None:
        pass

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        pass


def ejected_flags(pool: WorkerPool) -> dict[str, bool]:
    snap = json.loads(pool._pushed[4:])  # after the frame's length
    return {row["id"]: row["ejected"] for row in snap["backends"]}


async def test_a_push_is_timed_for_when_the_next_ejection_ends() -> None:
    now = [100.0]
    cluster = Cluster(
        SPECS,
        "round-robin",
        clock=lambda: now[0],
        rng=random.Random(1),
        outlier=OutlierSettings(consecutive_failures=1, base_ejection=5.0),
        retries=RetrySettings(),
    )
    cluster.failure(cluster.backends["b1"], "connect")
    until = cluster.outlier.ejected_until("b1")
    assert until is not None and until > now[0]
    pool = WorkerPool(Host(cluster), [], 2)  # no worker spawned: pushes reach nobody
    try:
        loop = asyncio.get_running_loop()
        before = loop.time()
        pool.push()
        after = loop.time()
        assert ejected_flags(pool) == {"b1": True, "b2": False, "b3": False}
        timer = pool._expiry
        assert timer is not None
        left = until - now[0]
        assert before + left <= timer.when() <= after + left + 0.01
        now[0] = until  # the timer's push: the ejection is over, nothing more to time
        pool.push()
        assert ejected_flags(pool) == {"b1": False, "b2": False, "b3": False}
        assert pool._expiry is None
        assert timer.cancelled()
    finally:
        pool.table.close()
