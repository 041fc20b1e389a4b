"""The balancer's side of the active/passive pair: the election decides, this acts.

Local mode (no privileges): both balancers are configured with the same
service address; only the active binds it, and a takeover binds it.
Container mode (`--vip`): the active adds the virtual IP to its interface and
announces it with gratuitous ARP; both keep listening on the wildcard address,
so whoever holds the VIP gets the traffic.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from balancer.pair.driver import ElectionDriver, validate_pair_config
from balancer.pair.election import ElectionConfig

if TYPE_CHECKING:
    from balancer.app import Balancer

log = logging.getLogger("balancer.pair")


def local_address_towards(peer: tuple[str, int]) -> str:
    """The source address the kernel would use to reach the peer (no packet is sent)."""
    family = socket.AF_INET6 if ":" in peer[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect(peer)
        return str(sock.getsockname()[0])


# rtnetlink constants (linux/rtnetlink.h, linux/netlink.h, linux/if_addr.h)
_RTM_NEWADDR, _RTM_DELADDR = 20, 21
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_REPLACE, _NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400
_NLMSG_ERROR = 2
_IFA_ADDRESS, _IFA_LOCAL = 1, 2


def netlink_addr_message(
    op: str, index: int, iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface, seq: int = 1
) -> bytes:
    """An RTM_NEWADDR (replace) or RTM_DELADDR request, as `ip addr replace|del` sends."""
    family = socket.AF_INET if iface.version == 4 else socket.AF_INET6
    addr = iface.ip.packed
    kinds = (_IFA_LOCAL, _IFA_ADDRESS) if iface.version == 4 else (_IFA_ADDRESS,)
    attrs = b"".join(struct.pack("=HH", 4 + len(addr), kind) + addr for kind in kinds)
    body = struct.pack("=BBBBI", family, iface.network.prefixlen, 0, 0, index) + attrs
    if op == "add":
        mtype, flags = _RTM_NEWADDR, _NLM_F_REQUEST | _NLM_F_ACK | _NLM_F_CREATE | _NLM_F_REPLACE
    elif op == "del":
        mtype, flags = _RTM_DELADDR, _NLM_F_REQUEST | _NLM_F_ACK
    else:
        raise ValueError(f"unknown netlink address op {op!r}")
    return struct.pack("=IHHII", 16 + len(body), mtype, flags, seq, 0) + body


def netlink_addr(
    op: str, interface: str, iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface
) -> None:
    """Add or delete an address; raises OSError with the kernel's errno on failure."""
    index = socket.if_nametoindex(interface)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(2.0)
        sock.bind((0, 0))
        sock.send(netlink_addr_message(op, index, iface))
        reply = sock.recv(65536)
    _, mtype, _, _, _ = struct.unpack_from("=IHHII", reply)
    if mtype == _NLMSG_ERROR:
        (err,) = struct.unpack_from("=i", reply, 16)
        if err:
            raise OSError(-err, os.strerror(-err))


def gratuitous_arp(interface: str, mac: bytes, ip: bytes) -> bytes:
    """An unsolicited ARP request announcing that `ip` is at `mac` (what arping -U sends)."""
    broadcast = b"\xff" * 6
    eth = broadcast + mac + b"\x08\x06"
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + b"\x00" * 6 + ip
    return eth + arp


class VirtualIP:
    """Adds/removes ADDR/PREFIX on an interface over netlink and announces it.

    Both happen in-process (a netlink socket, an AF_PACKET socket): forking `ip`
    and `arping` on the takeover path cost tens of milliseconds on a busy host.
    """

    def __init__(self, cidr: str, interface: str) -> None:
        self.iface = ipaddress.ip_interface(cidr)
        self.cidr = cidr
        self.interface = interface

    def _netlink(self, op: str) -> None:
        netlink_addr(op, self.interface, self.iface)

    async def add(self) -> None:
        try:
            self._netlink("add")
        except Exception as exc:  # NetlinkError carries errno + message
            raise OSError(f"cannot add {self.cidr} to {self.interface}: {exc}") from None
        if self.iface.version == 4:
            self.announce()
            # a second copy, as arping -c 2 does, in case the first one is lost
            asyncio.get_running_loop().call_later(0.2, self.announce)

    def announce(self) -> None:
        try:
            mac = bytes.fromhex(
                Path(f"/sys/class/net/{self.interface}/address")
                .read_text()
                .strip()
                .replace(":", "")
            )
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
                sock.bind((self.interface, 0))
                sock.send(gratuitous_arp(self.interface, mac, self.iface.ip.packed))
        except OSError as exc:
            # neighbours then switch when their ARP entry expires: slower, not broken
            log.warning("gratuitous ARP for %s on %s failed: %s", self.cidr, self.interface, exc)

    async def remove(self) -> None:
        try:
            self._netlink("del")
        except Exception as exc:
            # "not there" is the normal case at startup and for a passive
            if "Cannot assign" not in str(exc) and "99" not in str(exc):
                log.warning("removing %s from %s: %s", self.cidr, self.interface, exc)


class PairRole:
    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer
        pair = balancer.cfg.pair
        assert pair.peer and pair.bind
        checked = validate_pair_config(
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
            await self.vip.remove()

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
            await self.vip.remove()
        else:
            await b.stop_listening()
        b.role = role if role in ("active", "passive") else "passive"
        if b.role != old:
            self.transitions += 1
            b.emit("role", "", f"{old} -> {b.role}: {reason}")
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
