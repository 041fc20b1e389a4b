"""One periodic task enforces every deadline, instead of a timer per request."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from balancer.http1.exchange import Pool
from balancer.lb.cluster import Cluster

log = logging.getLogger("balancer.sweeper")


class Swept(Protocol):
    """A listener's context: HTTP (`ListenerContext`) or TCP mode (`TcpContext`)."""

    def sweep(self, now: float) -> None: ...


def sweep(now: float, contexts: list[Swept], cluster: Cluster, pool: Pool) -> None:
    """One round: retry-budget accounting, client deadlines, pool expiry."""
    cluster.flush_budget(now)
    for ctx in contexts:
        ctx.sweep(now)
    pool.expire(now)


class Sweeper:
    def __init__(
        self,
        contexts: list[Swept],
        cluster: Cluster,
        pool: Pool,
        period: float = 0.25,
    ) -> None:
        self.contexts = contexts
        self.cluster = cluster
        self.pool = pool
        self.period = period
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.period)
            try:
                sweep(loop.time(), self.contexts, self.cluster, self.pool)
            except Exception:  # a bug here must not stop deadline enforcement
                log.exception("sweeper failed")
