"""PairRole against a fake PairHost: two nodes over loopback UDP, no Balancer at all."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

from balancer.config import PairSettings
from balancer.pair.role import BalancerRole, PairRole

INTERVAL = 0.05
WAIT = 10.0  # an upper bound for waits, not a performance threshold


class FakeHost:
    """Records what the pair asks of the balancer; start_listening can be made to fail."""

    def __init__(self, healthy: int = 2) -> None:
        self.listening = False
        self.healthy = healthy
        self.roles: list[tuple[BalancerRole, str]] = []
        self.bind_error: OSError | None = None

    async def start_listening(self) -> None:
        if self.bind_error is not None:
            raise self.bind_error
        self.listening = True

    async def stop_listening(self) -> None:
        self.listening = False

    def healthy_backends(self) -> int:
        return self.healthy

    def report_role(self, role: BalancerRole, reason: str) -> None:
        self.roles.append((role, reason))


def free_udp_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [int(s.getsockname()[1]) for s in socks]
    for s in socks:
        s.close()
    return ports


def settings(bind: int, peer: int, priority: int, secret: Path) -> PairSettings:
    return PairSettings(
        peer=f"127.0.0.1:{peer}",
        bind=f"127.0.0.1:{bind}",
        priority=priority,
        advert_interval=INTERVAL,
        secret_file=str(secret),
    )


async def wait_until(pred: Any) -> None:
    async with asyncio.timeout(WAIT):
        while not pred():
            await asyncio.sleep(INTERVAL / 5)


async def test_the_pair_drives_a_host_through_the_protocol_only(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    p_hi, p_lo = free_udp_ports(2)
    hi_host, lo_host = FakeHost(), FakeHost()
    hi = PairRole(settings(p_hi, p_lo, 200, secret), hi_host)
    lo = PairRole(settings(p_lo, p_hi, 100, secret), lo_host)
    await lo.start()
    await hi.start()
    try:
        await wait_until(lambda: hi_host.roles and lo.status().get("peer"))
        assert hi_host.roles[0][0] == "active" and hi_host.listening
        assert (hi.role, lo.role) == ("active", "passive")
        assert lo_host.roles == [] and not lo_host.listening
        assert lo.status()["mode"] == "local" and lo.status()["transitions"] == 0
        # a clean stop of the active resigns: the passive takes over and binds
        await hi.stop()
        await wait_until(lambda: lo_host.roles)
        assert lo_host.roles == [("active", "peer stepped down")] and lo_host.listening
        assert lo.status()["transitions"] == 1
    finally:
        await lo.stop()
        await hi.stop()


async def test_an_active_that_cannot_bind_says_so_in_its_status(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    port, peer = free_udp_ports(2)
    host = FakeHost()
    host.bind_error = OSError(98, "Address already in use")
    role = PairRole(settings(port, peer, 150, secret), host)
    await role.start()  # alone: it becomes active after the master-down time
    try:
        await wait_until(lambda: "listen_error" in role.status())
        assert host.roles and host.roles[0][0] == "active"
        assert not host.listening
        assert "Address already in use" in role.status()["listen_error"]
    finally:
        await role.stop()
