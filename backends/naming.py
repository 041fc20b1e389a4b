"""`python -m backends.naming SERVICE`: print this container's compose name, `SERVICE-N`.

docker/backend.sh names the demo backend with it, so X-Backend says `backend-3` where the
balancer (which names discovered addresses by the same reverse lookup) says `backend-3`.
The reverse lookup asks the DNS server of /etc/resolv.conf directly: the C resolver reads
/etc/hosts first, and there Docker maps our own address to the container ID.
Without an answer that names a replica of SERVICE it prints the fallback (the hostname).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

from balancer.lb.names import replica_name

TIMEOUT_S = 2.0
PTR, IN = 12, 1


def nameservers(resolv_conf: str = "/etc/resolv.conf") -> list[str]:
    try:
        lines = Path(resolv_conf).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            out.append(parts[1])
    return out


def ptr_query(addr: str, ident: int) -> bytes:
    """A DNS query (recursion desired) for the PTR record of IPv4/IPv6 `addr`."""
    qname = ipaddress.ip_address(addr).reverse_pointer
    labels = b"".join(bytes([len(p)]) + p.encode("ascii") for p in qname.split("."))
    return (
        struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0)
        + labels
        + b"\0"
        + struct.pack("!HH", PTR, IN)
    )


def _read_name(msg: bytes, pos: int) -> tuple[str, int]:
    """A possibly compressed name at `pos` -> (name, position after it)."""
    labels: list[str] = []
    end = -1
    for _ in range(128):  # bounded: a pointer loop in a hostile answer ends here
        length = msg[pos]
        if length & 0xC0 == 0xC0:
            if end < 0:
                end = pos + 2
            pos = ((length & 0x3F) << 8) | msg[pos + 1]
            continue
        if length == 0:
            return ".".join(labels), end if end >= 0 else pos + 1
        labels.append(msg[pos + 1 : pos + 1 + length].decode("ascii", "replace"))
        pos += 1 + length
    raise ValueError("name too long")


def parse_ptr_answer(msg: bytes, ident: int) -> str | None:
    """The first PTR name in a DNS response to query `ident`, or None."""
    if len(msg) < 12:
        return None
    rid, flags, qd, an, _, _ = struct.unpack("!HHHHHH", msg[:12])
    if rid != ident or not flags & 0x8000 or flags & 0x000F:
        return None  # not our answer, not an answer, or an error (NXDOMAIN...)
    pos = 12
    try:
        for _ in range(qd):
            _, pos = _read_name(msg, pos)
            pos += 4
        for _ in range(an):
            _, pos = _read_name(msg, pos)
            rtype, _, _, rdlen = struct.unpack("!HHIH", msg[pos : pos + 10])
            pos += 10
            if rtype == PTR:
                return _read_name(msg, pos)[0]
            pos += rdlen
    except (IndexError, ValueError, struct.error):
        return None
    return None


def reverse_lookup(addr: str, servers: Sequence[str], port: int = 53) -> str | None:
    ident = int.from_bytes(os.urandom(2), "big")
    query = ptr_query(addr, ident)
    for server in servers:
        family = socket.AF_INET6 if ":" in server else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(TIMEOUT_S)
            try:
                sock.sendto(query, (server, port))
                answer = parse_ptr_answer(sock.recv(4096), ident)
            except OSError:
                continue
            if answer:
                return answer
    return None


def own_address() -> str | None:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return None


def compose_name(service: str, fallback: str, port: int = 53) -> str:
    addr = own_address()
    ptr = reverse_lookup(addr, nameservers(), port) if addr is not None else None
    name = replica_name(ptr, service) if ptr is not None else None
    return name or fallback


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not args[0] or args[0].startswith("-"):
        print("usage: python -m backends.naming SERVICE", file=sys.stderr)
        return 2
    print(compose_name(args[0], socket.gethostname()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
