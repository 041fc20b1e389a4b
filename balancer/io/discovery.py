"""DNS discovery's driver: re-resolve `discover` names every `discover_interval`; new
addresses join the cluster (named by reverse DNS, as their containers are), gone ones
drain and leave. Runs as one task of the process that owns the cluster's membership."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

from balancer.config import BackendSpec, Config, split_hostport
from balancer.events import EventKind
from balancer.io.names import reverse_replica_name
from balancer.lb.cluster import Cluster

log = logging.getLogger("balancer")


class Discovery:
    def __init__(
        self,
        cluster: Cluster,
        config: Callable[[], Config],
        emit: Callable[[EventKind, str, str], None],
        drain_and_remove: Callable[[str], None],
        sync_checks: Callable[[], None],
    ) -> None:
        self.cluster = cluster
        self.config = config  # read each round: a reload may change the names or interval
        self.emit = emit
        self.drain_and_remove = drain_and_remove
        self.sync_checks = sync_checks

    async def run(self) -> None:
        """Re-resolve DNS names; new addresses join (named by reverse DNS), gone ones drain."""
        loop = asyncio.get_running_loop()
        first = True
        while True:
            cfg = self.config()
            # every backend's address (ids are names, DNS answers addresses): an address
            # already configured or discovered is not added a second time
            by_address = {b.address for b in self.cluster.backends.values()}
            seen: set[str] = set()
            new: dict[str, tuple[str, int, str]] = {}  # address -> (host, port, service)
            for spec in cfg.discover:
                host, port = split_hostport(spec, "discover")
                try:
                    infos = await loop.getaddrinfo(
                        host, port, type=socket.SOCK_STREAM, family=socket.AF_INET
                    )
                except (OSError, UnicodeError) as exc:
                    if first:
                        self.emit(EventKind.DISCOVERY, "", f"{host}: no servers yet ({exc})")
                    continue
                for info in infos:
                    addr = str(info[4][0])
                    seen.add(f"{addr}:{port}")
                    if f"{addr}:{port}" not in by_address:
                        new.setdefault(f"{addr}:{port}", (addr, port, host.split(".", 1)[0]))
            # new addresses are named concurrently: a --scale of ten waits for one lookup
            await asyncio.gather(*(self._add(loop, *args) for args in new.values()))
            for bid, backend in list(self.cluster.backends.items()):
                if (
                    backend.discovered
                    and backend.address not in seen
                    and backend.admin_state != "draining"
                ):
                    self.drain_and_remove(bid)
            self.sync_checks()
            first = False
            await asyncio.sleep(cfg.discover_interval)

    async def _add(
        self, loop: asyncio.AbstractEventLoop, addr: str, port: int, service: str
    ) -> None:
        """Name a new address as its container is named (`backend-3`), then add it.

        The reverse lookup runs in the executor, in the discovery task, never on the data
        path; without an answer that names a replica of `service` the name is the address.
        """
        address = f"{addr}:{port}"
        name = await reverse_replica_name(loop, addr, service)
        existing = self.cluster.backends.get(name) if name is not None else None
        if existing is not None:
            if existing.discovered and existing.admin_state == "draining":
                return  # a replica that moved: its old address drains first, next round adds
            log.warning("discovery: %s is named %s, taken by %s", address, name, existing.address)
            name = None
        spec = BackendSpec(addr, port, name=name)
        self.cluster.add(spec, discovered=True)
        self.emit(EventKind.ADDED, spec.id, f"{address}, discovered via {service}")
