"""The balancer's side of the active/passive pair: the election decides, this acts.

Local mode (no privileges): both balancers are configured with the same
service address; only the active binds it, and a takeover binds it.
Container mode (`--vip`): the active adds the virtual IP to its interface and
announces it with gratuitous ARP; both keep listening on the wildcard address,
so whoever holds the VIP gets the traffic.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any, Literal, Protocol

from balancer.config import PairSettings, split_hostport
from balancer.pair.driver import ElectionDriver, load_secret
from balancer.pair.election import ElectionConfig
from balancer.pair.vip import VirtualIP

log = logging.getLogger("balancer.pair")

# A balancer's role: alone, or one of a pair (the election's "init" is never reported).
BalancerRole = Literal["standalone", "active", "passive"]


class PairHost(Protocol):
    """What the pair needs from the balancer it runs in (balancer.app.Balancer is one)."""

    @property
    def listening(self) -> bool: ...

    async def start_listening(self) -> None:
        """Bind the public listener(s); OSError if the address is taken."""

    async def stop_listening(self) -> None:
        """Unbind the public listener(s); established connections go on."""

    def healthy_backends(self) -> int:
        """Backends that can take traffic in normal mode; 0 in backup or panic mode."""

    def report_role(self, role: BalancerRole, reason: str) -> None:
        """This node's role changed to `role`."""


def local_address_towards(peer: tuple[str, int]) -> str:
    """The source address the kernel would use to reach the peer (no packet is sent)."""
    family = socket.AF_INET6 if ":" in peer[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect(peer)
        return str(sock.getsockname()[0])


class PairRole:
    """Runs this balancer's side of the pair: the election driver, the VIP, tracking."""

    def __init__(self, settings: PairSettings, host: PairHost) -> None:
        self.host = host
        self.settings = settings
        # balancer.config validated every pair setting; the secret is read here, at start
        assert settings.peer and settings.bind and settings.secret_file
        bind = split_hostport(settings.bind, "pair.bind", wildcard=False)
        peer = split_hostport(settings.peer, "pair.peer", wildcard=False)
        self.vip = VirtualIP(settings.vip, settings.vip_interface or "") if settings.vip else None
        node_host = bind[0]
        if node_host in ("0.0.0.0", "::", ""):
            node_host = local_address_towards(peer)
        # ties are broken by address: in local mode both share 127.0.0.1, so add the port
        node = f"{node_host}:{bind[1]}" if self.vip is None else node_host
        self.driver = ElectionDriver(
            ElectionConfig(
                node=node,
                priority=settings.priority,
                advert_interval=settings.advert_interval,
                preempt=settings.preempt,
            ),
            bind=bind,
            peer=peer,
            secret=load_secret(settings.secret_file),
            on_role_change=self._on_role,
        )
        self.role: BalancerRole = "passive"  # until the election says otherwise
        self.listen_error = ""
        self.tracker: asyncio.Task[None] | None = None
        self.transitions = 0

    async def start(self) -> None:
        if self.vip is not None:
            # a SIGKILLed predecessor leaves the VIP behind
            await self.vip.remove()
            await self.host.start_listening()
        self.driver.set_tracking(listener_ok=True, healthy_backends=self.host.healthy_backends())
        await self.driver.start()
        self.tracker = asyncio.get_running_loop().create_task(self._track())

    async def stop(self) -> None:
        started = self.tracker is not None  # a start that failed added no VIP
        if self.tracker is not None:
            self.tracker.cancel()
        await self.driver.stop(resign=True)
        if self.vip is not None and started:
            try:
                await self.vip.remove()
            except OSError as exc:  # stopping anyway; the log says the VIP stayed behind
                log.error("%s", exc)

    async def _on_role(self, role: str, reason: str) -> None:
        if role == "active":
            try:
                if self.vip is not None:
                    await self.vip.add()
                else:
                    await self._bind_with_retry()
                self.listen_error = ""
            except OSError as exc:
                self.listen_error = str(exc)
                log.error("became active but cannot serve: %s", exc)
        elif self.vip is not None:
            try:
                await self.vip.remove()
            except OSError as exc:  # both nodes may now answer for the VIP: say so loudly
                log.error("became passive but still hold the VIP: %s", exc)
        else:
            await self.host.stop_listening()
        old = self.role
        new: BalancerRole = "active" if role == "active" else "passive"
        if new != old:
            self.role = new
            self.transitions += 1
            log.info("role %s -> %s (%s)", old, new, reason)
            self.host.report_role(new, reason)

    async def _bind_with_retry(self) -> None:
        """Local mode: the old active may still hold the port for a moment."""
        last: OSError | None = None
        for _ in range(40):
            if self.driver.role != "active":
                return
            try:
                await self.host.start_listening()
                return
            except OSError as exc:
                last = exc
                await asyncio.sleep(0.05)
        if last is not None:
            raise last

    async def _track(self) -> None:
        """Lower our priority when we cannot serve; the election hands over."""
        interval = max(0.1, self.settings.advert_interval)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._track_once()
            except Exception:  # a bug here must not silently stop tracking for good
                log.exception("pair tracking failed; trying again next interval")

    async def _track_once(self) -> None:
        """One round of tracking: listener and backends feed the effective priority."""
        host = self.host
        healthy = host.healthy_backends()
        listener_ok = not self.listen_error and (self.role != "active" or host.listening)
        if self.role == "active" and self.vip is None and not host.listening:
            try:
                await self._bind_with_retry()
                self.listen_error = ""
            except OSError as exc:
                self.listen_error = str(exc)
        self.driver.set_tracking(listener_ok=listener_ok, healthy_backends=healthy)

    def status(self) -> dict[str, Any]:
        """The pair's status now (peer ages computed at this moment, not at the last publish)."""
        status: dict[str, Any] = self.driver.status()
        status["transitions"] = self.transitions
        status["mode"] = "vip" if self.vip is not None else "local"
        if self.vip is not None:
            status["vip"] = self.vip.cidr
        if self.listen_error:
            status["listen_error"] = self.listen_error
        status["updated"] = time.time()
        return status
