"""The PROXY protocol (HAProxy's spec, versions 1 and 2): encode and parse, pure.

A relay in front of a server prepends one header to the connection carrying the client's
real address. `encode()` builds it; `parse()` reads it from the bytes received so far,
bounded (v1 is at most 107 bytes, v2 at most 16 + `MAX_V2_BODY`) and never raising.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the spec's bound, CRLF included
MAX_V2_BODY = 1024  # addresses plus TLVs we are willing to skip
_V2_CMD_LOCAL, _V2_CMD_PROXY = 0x20, 0x21
_FAM_TCP4, _FAM_TCP6, _FAM_UNSPEC = 0x11, 0x21, 0x00


@dataclass(frozen=True)
class ProxyHeader:
    """The outcome of `parse`: `status` is "more", "ok" or "invalid". With "ok",
    `consumed` bytes were the header and `source` is the client's (ip, port), or None for
    a LOCAL/UNKNOWN header (the connection's own address stands)."""

    status: str
    consumed: int = 0
    source: tuple[str, int] | None = None
    dest: tuple[str, int] | None = None
    reason: str = ""


MORE = ProxyHeader("more")


def _invalid(reason: str) -> ProxyHeader:
    return ProxyHeader("invalid", reason=reason)


def encode(version: str, source: tuple[str, int], dest: tuple[str, int]) -> bytes:
    """The header announcing a connection from `source` to `dest` (ip, port)."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(dest[0])
    if src.version != dst.version:  # e.g. a v4 client on a v6 socket: map both to v6
        src = _as_v6(src)
        dst = _as_v6(dst)
    if version == "v1":
        family = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {family} {src} {dst} {source[1]} {dest[1]}\r\n".encode("ascii")
    fam = _FAM_TCP4 if src.version == 4 else _FAM_TCP6
    body = src.packed + dst.packed + source[1].to_bytes(2) + dest[1].to_bytes(2)
    return V2_SIGNATURE + bytes((_V2_CMD_PROXY, fam)) + len(body).to_bytes(2) + body


def encode_local(version: str) -> bytes:
    """A header that carries no client address: the balancer's own connections (checks)."""
    if version == "v1":
        return b"PROXY UNKNOWN\r\n"
    return V2_SIGNATURE + bytes((_V2_CMD_LOCAL, _FAM_UNSPEC)) + b"\x00\x00"


def _as_v6(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(addr, ipaddress.IPv6Address):
        return addr
    return ipaddress.IPv6Address(f"::ffff:{addr}")


def parse(data: bytes) -> ProxyHeader:
    """Read a PROXY header (v1 or v2) at the start of `data`."""
    if data[:1] == b"\r":
        return _parse_v2(data)
    if data[:1] == b"P":
        return _parse_v1(data)
    if not data:
        return MORE
    return _invalid("no PROXY header")


def _parse_v1(data: bytes) -> ProxyHeader:
    if not V1_PREFIX.startswith(data[:6]):
        return _invalid("no PROXY header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        return MORE if len(data) < V1_MAX else _invalid("PROXY v1 line too long")
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        return _invalid("PROXY v1 line is not ASCII")
    parts = line.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader("ok", end + 2)
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        return _invalid("malformed PROXY v1 line")
    try:
        src, dst = ipaddress.ip_address(parts[2]), ipaddress.ip_address(parts[3])
    except ValueError:
        return _invalid("bad address in PROXY v1 line")
    if src.version != dst.version or src.version != (4 if parts[1] == "TCP4" else 6):
        return _invalid("address family mismatch in PROXY v1 line")
    ports = []
    for p in parts[4:6]:
        if not (p.isdigit() and p.isascii() and len(p) <= 5 and int(p) <= 65535):
            return _invalid("bad port in PROXY v1 line")
        if len(p) > 1 and p[0] == "0":
            return _invalid("bad port in PROXY v1 line")
        ports.append(int(p))
    return ProxyHeader("ok", end + 2, (str(src), ports[0]), (str(dst), ports[1]))


def _parse_v2(data: bytes) -> ProxyHeader:
    head = data[:12]
    if not V2_SIGNATURE.startswith(head):
        return _invalid("no PROXY header")
    if len(data) < 16:
        return MORE
    cmd, fam = data[12], data[13]
    length = int.from_bytes(data[14:16])
    if cmd not in (_V2_CMD_LOCAL, _V2_CMD_PROXY):
        return _invalid(f"PROXY v2 command/version byte {cmd:#x}")
    if length > MAX_V2_BODY:
        return _invalid(f"PROXY v2 header of {length} bytes")
    if len(data) < 16 + length:
        return MORE
    body = data[16 : 16 + length]
    consumed = 16 + length
    if cmd == _V2_CMD_LOCAL or fam == _FAM_UNSPEC:
        return ProxyHeader("ok", consumed)
    if fam == _FAM_TCP4:
        if length < 12:
            return _invalid("PROXY v2 TCP4 header too short")
        src = str(ipaddress.IPv4Address(body[0:4]))
        dst = str(ipaddress.IPv4Address(body[4:8]))
        sport, dport = int.from_bytes(body[8:10]), int.from_bytes(body[10:12])
    elif fam == _FAM_TCP6:
        if length < 36:
            return _invalid("PROXY v2 TCP6 header too short")
        src = str(ipaddress.IPv6Address(body[0:16]))
        dst = str(ipaddress.IPv6Address(body[16:32]))
        sport, dport = int.from_bytes(body[32:34]), int.from_bytes(body[34:36])
    else:
        return _invalid(f"PROXY v2 family {fam:#x} is not TCP")
    return ProxyHeader("ok", consumed, (src, sport), (dst, dport))


def looks_like_header(data: bytes | bytearray) -> bool | None:
    """Whether `data` starts a PROXY header (v1 or v2); None while too short to tell."""
    for sig in (V1_PREFIX, V2_SIGNATURE):
        n = min(len(data), len(sig))
        if n and bytes(data[:n]) == sig[:n]:
            return True if n == len(sig) else None
    return False if data else None


def trusted(
    source_ip: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> bool:
    """Whether a connection from `source_ip` may (and must) send a PROXY header."""
    try:
        addr = ipaddress.ip_address(source_ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in networks)
