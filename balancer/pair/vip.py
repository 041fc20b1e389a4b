"""The pair's virtual IP (container mode): add/remove it over netlink, announce it by ARP.

Both happen in-process (a netlink socket, an AF_PACKET socket): forking `ip` and `arping`
on the takeover path cost tens of milliseconds on a busy host.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TypeAlias

log = logging.getLogger("balancer.pair")

IPInterface: TypeAlias = ipaddress.IPv4Interface | ipaddress.IPv6Interface
NetlinkAddr: TypeAlias = Callable[[str, str, IPInterface], None]

# rtnetlink constants (linux/rtnetlink.h, linux/netlink.h, linux/if_addr.h)
_RTM_NEWADDR, _RTM_DELADDR = 20, 21
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_REPLACE, _NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400
_NLMSG_ERROR = 2
_IFA_ADDRESS, _IFA_LOCAL = 1, 2


def netlink_addr_message(op: str, index: int, iface: IPInterface, seq: int = 1) -> bytes:
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


def netlink_addr(op: str, interface: str, iface: IPInterface) -> None:
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


def _named(exc: OSError, what: str) -> OSError:
    """One line that says what failed and why; the errno is kept for callers that test it."""
    message = f"{what}: {exc.strerror or exc}"
    return OSError(exc.errno, message) if exc.errno is not None else OSError(message)


class VirtualIP:
    """Adds/removes ADDR/PREFIX on an interface and announces it (``netlink`` for tests)."""

    def __init__(self, cidr: str, interface: str, *, netlink: NetlinkAddr = netlink_addr) -> None:
        self.iface = ipaddress.ip_interface(cidr)
        self.cidr = cidr
        self.interface = interface
        self._netlink = netlink

    async def add(self) -> None:
        try:
            self._netlink("add", self.interface, self.iface)
        except OSError as exc:
            raise _named(exc, f"cannot add {self.cidr} to {self.interface}") from None
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
        """Delete the VIP; not holding it is fine, any other failure raises OSError.

        Not holding it is the normal case at startup and for a passive. Anything else (no
        such interface, no CAP_NET_ADMIN) means this node cannot give the VIP up.
        """
        try:
            self._netlink("del", self.interface, self.iface)
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:  # the kernel's "address not there"
                return
            raise _named(exc, f"cannot remove {self.cidr} from {self.interface}") from None
