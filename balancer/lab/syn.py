"""Parse a saved SYN (TCP_SAVE_SYN on the listener, TCP_SAVED_SYN on the accepted socket):
the client's IP and TCP headers as the kernel received them. Pure: bytes in.

What the 3-way handshake's first segment offered: MSS, window scale, SACK permitted,
timestamps, and ECN (a SYN with ECE and CWR set asks for ECN, RFC 3168 §6.1.1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

OPT_EOL, OPT_NOP, OPT_MSS, OPT_WSCALE, OPT_SACK_PERM, OPT_TIMESTAMPS = 0, 1, 2, 3, 4, 8
OPT_FASTOPEN = 34
OPT_NAMES = {
    OPT_MSS: "mss",
    OPT_WSCALE: "wscale",
    OPT_SACK_PERM: "sackOK",
    OPT_TIMESTAMPS: "TS",
    OPT_FASTOPEN: "TFO",
    5: "SACK",
    19: "MD5",
    29: "TCP-AO",
    30: "MPTCP",
}
TCP_SYN, TCP_ECE, TCP_CWR = 0x02, 0x40, 0x80
IPPROTO_TCP = 6


class SynError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class SynInfo:
    ip_version: int
    ttl: int  # hop limit for IPv6
    ip_ecn: int  # the ECN field of the IP header (0: not ECN-capable, usual on a SYN)
    window: int  # the SYN's window field (never scaled)
    mss: int | None
    wscale: int | None  # shift count; None: window scaling not offered
    sack_permitted: bool
    timestamps: bool
    ecn: bool  # ECE and CWR set: the client asks for ECN
    fastopen: bool
    options: tuple[str, ...]  # option names in the order sent

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["options"] = list(self.options)
        return d


def _ip(raw: bytes) -> tuple[int, int, int, int]:
    """(version, ttl, ecn, offset of the TCP header)."""
    if not raw:
        raise SynError("empty SYN")
    version = raw[0] >> 4
    if version == 4:
        ihl = (raw[0] & 0x0F) * 4
        if ihl < 20 or len(raw) < ihl:
            raise SynError("truncated IPv4 header")
        if raw[9] != IPPROTO_TCP:
            raise SynError(f"IPv4 protocol {raw[9]} is not TCP")
        return 4, raw[8], raw[1] & 0x03, ihl
    if version == 6:
        if len(raw) < 40:
            raise SynError("truncated IPv6 header")
        if raw[6] != IPPROTO_TCP:  # extension headers: not on a SYN we accept
            raise SynError(f"IPv6 next header {raw[6]} is not TCP")
        tclass = ((raw[0] & 0x0F) << 4) | (raw[1] >> 4)
        return 6, raw[7], tclass & 0x03, 40
    raise SynError(f"IP version {version}")


def parse(raw: bytes) -> SynInfo:
    """The SYN's IP/TCP facts and options. SynError for anything else."""
    version, ttl, ip_ecn, off = _ip(raw)
    tcp = raw[off:]
    if len(tcp) < 20:
        raise SynError("truncated TCP header")
    doff = (tcp[12] >> 4) * 4
    flags = tcp[13]
    if doff < 20 or len(tcp) < doff:
        raise SynError("bad TCP data offset")
    if not flags & TCP_SYN:
        raise SynError("not a SYN")
    window = int.from_bytes(tcp[14:16], "big")
    mss = wscale = None
    sack = ts = tfo = False
    names: list[str] = []
    opts = tcp[20:doff]
    i = 0
    while i < len(opts):  # bounded: every step advances i by at least 1
        kind = opts[i]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= len(opts) or opts[i + 1] < 2 or i + opts[i + 1] > len(opts):
            raise SynError(f"malformed TCP option {kind}")
        length = opts[i + 1]
        body = opts[i + 2 : i + length]
        if kind == OPT_MSS and length == 4:
            mss = int.from_bytes(body, "big")
        elif kind == OPT_WSCALE and length == 3:
            wscale = body[0]
        elif kind == OPT_SACK_PERM:
            sack = True
        elif kind == OPT_TIMESTAMPS:
            ts = True
        elif kind == OPT_FASTOPEN:
            tfo = True
        names.append(OPT_NAMES.get(kind, f"opt{kind}"))
        i += length
    return SynInfo(
        ip_version=version,
        ttl=ttl,
        ip_ecn=ip_ecn,
        window=window,
        mss=mss,
        wscale=wscale,
        sack_permitted=sack,
        timestamps=ts,
        ecn=(flags & (TCP_ECE | TCP_CWR)) == (TCP_ECE | TCP_CWR),
        fastopen=tfo,
        options=tuple(names),
    )
