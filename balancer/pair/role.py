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
from typing import TYPE_CHECKING, Any

from balancer.events import EventKind
from balancer.pair.driver import ElectionDriver, validate_pair_config
from balancer.pair.election import ElectionConfig
from balancer.pair.vip import VirtualIP

if TYPE_CHECKING:
    from balancer.app import Balancer

log = logging.getLogger("balancer.pair")


def local_address_towards(peer: tuple[str, int]) -> str:
    """The source address the kernel would use to reach the peer (no packet is sent)."""
    family = socket.AF_INET6 if ":" in peer[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect(peer)
        return str(sock.getsockname()[0])


class PairRole:
    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer
        pair = balancer.cfg.pair
        assert pair.peer and pair.bind
        checked = validate_pair_config(
            priority=pair.priority,
            advert_interval=pair.advert_interval,
            secret_file=pair.secret_file,
            bind=pair.bind,
            peer=pair.peer,
        )
        self.vip = VirtualIP(pair.vip, pair.vip_interface or "") if pair.vip else None
        host = checked.bind[0]
        if host in ("0.0.0.0", "::", ""):
            host = local_address_towards(checked.peer)
        # ties are broken by address: in local mode both share 127.0.0.1, so add the port
        node = f"{host}:{checked.bind[1]}" if self.vip is None else host
        self.driver = ElectionDriver(
            ElectionConfig(
                node=node,
                priority=pair.priority,
                advert_interval=pair.advert_interval,
                preempt=pair.preempt,
            ),
            bind=checked.bind,
            peer=checked.peer,
            secret=checked.secret,
            on_role_change=self._on_role,
        )
        self.listen_error = ""
        self.tracker: asyncio.Task[None] | None = None
        self.transitions = 0

    async def start(self) -> None:
        b = self.balancer
        b.role = "passive"
        if self.vip is not None:
            # a SIGKILLed predecessor leaves the VIP behind
            await self.vip.remove()
            await b.start_listening()
        await self.driver.start()
        self.tracker = asyncio.get_running_loop().create_task(self._track())
        self._publish()

    async def stop(self) -> None:
        if self.tracker is not None:
            self.tracker.cancel()
        await self.driver.stop(resign=True)
        if self.vip is not None:
            try:
                await self.vip.remove()
            except OSError as exc:  # stopping anyway; the log says the VIP stayed behind
                log.error("%s", exc)

    async def _on_role(self, role: str, reason: str) -> None:
        b = self.balancer
        old = b.role
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
            await b.stop_listening()
        b.role = role if role in ("active", "passive") else "passive"
        if b.role != old:
            self.transitions += 1
            b.emit(EventKind.ROLE, "", f"{old} -> {b.role}: {reason}")
            log.info("role %s -> %s (%s)", old, b.role, reason)
        self._publish()

    async def _bind_with_retry(self) -> None:
        """Local mode: the old active may still hold the port for a moment."""
        b = self.balancer
        last: OSError | None = None
        for _ in range(40):
            if self.driver.role != "active":
                return
            try:
                await b.start_listening()
                return
            except OSError as exc:
                last = exc
                await asyncio.sleep(0.05)
        if last is not None:
            raise last

    async def _track(self) -> None:
        """Lower our priority when we cannot serve; the election hands over."""
        b = self.balancer
        interval = max(0.1, b.cfg.pair.advert_interval)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._track_once()
            except Exception:  # a bug here must not silently stop tracking for good
                log.exception("pair tracking failed; trying again next interval")

    async def _track_once(self) -> None:
        """One round of tracking: listener and backends feed the effective priority."""
        b = self.balancer
        # eligible() first: it refreshes cluster.mode, which a passive (no traffic) never does
        eligible = len(b.cluster.eligible(b.clock()))
        healthy = eligible if b.cluster.mode == "normal" else 0
        listener_ok = not self.listen_error and (b.role != "active" or b.listening)
        if b.role == "active" and self.vip is None and not b.listening:
            try:
                await self._bind_with_retry()
                self.listen_error = ""
            except OSError as exc:
                self.listen_error = str(exc)
        self.driver.set_tracking(listener_ok=listener_ok, healthy_backends=healthy)
        self._publish()

    def _publish(self) -> None:
        status: dict[str, Any] = self.driver.status()
        status["transitions"] = self.transitions
        status["mode"] = "vip" if self.vip is not None else "local"
        if self.vip is not None:
            status["vip"] = self.vip.cidr
        if self.listen_error:
            status["listen_error"] = self.listen_error
        status["updated"] = time.time()
        self.balancer.role_detail = status
