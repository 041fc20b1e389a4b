"""Decode Linux `struct tcp_info` (getsockopt TCP_INFO) into typed fields. Pure: bytes in.

The struct grew over kernel versions; fields past the end of what the kernel returned are
None. Offsets are from include/uapi/linux/tcp.h.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from typing import Any

# include/net/tcp_states.h
TCP_STATES = (
    "",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
    "BOUND_INACTIVE",
)
CA_STATES = ("open", "disorder", "cwr", "recovery", "loss")
TCPI_OPT_TIMESTAMPS = 1
TCPI_OPT_SACK = 2
TCPI_OPT_WSCALE = 4
TCPI_OPT_ECN = 8
INFINITE_SSTHRESH = 0x7FFFFFFF

# (name, struct code, offset); u32 unless said
_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("rto", "I", 8),
    ("snd_mss", "I", 16),
    ("rcv_mss", "I", 20),
    ("unacked", "I", 24),
    ("sacked", "I", 28),
    ("lost", "I", 32),
    ("retrans", "I", 36),
    ("last_data_sent", "I", 44),
    ("last_data_recv", "I", 52),
    ("pmtu", "I", 60),
    ("rcv_ssthresh", "I", 64),
    ("rtt", "I", 68),
    ("rttvar", "I", 72),
    ("snd_ssthresh", "I", 76),
    ("snd_cwnd", "I", 80),
    ("advmss", "I", 84),
    ("reordering", "I", 88),
    ("rcv_rtt", "I", 92),
    ("rcv_space", "I", 96),
    ("total_retrans", "I", 100),
    ("pacing_rate", "Q", 104),
    ("bytes_acked", "Q", 120),
    ("bytes_received", "Q", 128),
    ("segs_out", "I", 136),
    ("segs_in", "I", 140),
    ("notsent_bytes", "I", 144),
    ("min_rtt", "I", 148),
    ("delivery_rate", "Q", 160),
    ("bytes_sent", "Q", 200),
    ("bytes_retrans", "Q", 208),
    ("snd_wnd", "I", 228),
    ("rcv_wnd", "I", 232),
)
_RAW = {name: (struct.Struct("<" + code), off) for name, code, off in _FIELDS}
MIN_LEN = 104  # up to total_retrans: every kernel this project runs on has it


class TcpInfoError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class TcpInfo:
    state: str
    ca_state: str
    rtt_ms: float
    rttvar_ms: float
    min_rtt_ms: float | None
    rto_ms: float
    cwnd: int  # segments
    ssthresh: int | None  # segments; None while still in the first slow start (infinite)
    snd_mss: int
    rcv_mss: int
    unacked: int
    sacked: int
    lost: int
    retrans: int  # segments retransmitted and not yet acknowledged
    total_retrans: int
    snd_wnd: int | None  # the peer's advertised receive window, bytes (Linux >= 5.4)
    rcv_wnd: int | None  # ours, bytes (Linux >= 6.2)
    rcv_space: int  # our receive-buffer autotuning estimate, bytes
    snd_wscale: int
    rcv_wscale: int
    timestamps: bool
    sack: bool
    wscale: bool
    ecn: bool
    pacing_rate_bps: int | None
    delivery_rate_bps: int | None
    bytes_sent: int | None
    bytes_acked: int | None
    bytes_received: int | None
    bytes_retrans: int | None
    segs_out: int | None
    segs_in: int | None
    notsent_bytes: int | None
    pmtu: int
    idle_ms: int  # since data last went either way: an idle connection's RTT is stale

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _get(raw: bytes, name: str) -> int | None:
    st, off = _RAW[name]
    if len(raw) < off + st.size:
        return None
    value: int = st.unpack_from(raw, off)[0]
    return value


def _req(raw: bytes, name: str) -> int:
    v = _get(raw, name)
    assert v is not None  # MIN_LEN covers every required field
    return v


def _ms(us: int | None) -> float | None:
    return None if us is None else round(us / 1000, 3)


def _bps(bytes_per_s: int | None) -> int | None:
    if bytes_per_s is None or bytes_per_s == 2**64 - 1:  # ~0: unknown / unlimited
        return None
    return bytes_per_s * 8


def decode(raw: bytes) -> TcpInfo:
    """The fields of one TCP_INFO answer. TcpInfoError when it is too short to be one."""
    if len(raw) < MIN_LEN:
        raise TcpInfoError(f"tcp_info of {len(raw)} bytes, expected at least {MIN_LEN}")
    state, ca_state, _retransmits, _probes, _backoff, options, wscale = struct.unpack_from(
        "<7B", raw, 0
    )
    ssthresh = _req(raw, "snd_ssthresh")
    rtt = _req(raw, "rtt")
    rttvar = _req(raw, "rttvar")
    return TcpInfo(
        state=TCP_STATES[state] if state < len(TCP_STATES) else str(state),
        ca_state=CA_STATES[ca_state] if ca_state < len(CA_STATES) else str(ca_state),
        rtt_ms=rtt / 1000,
        rttvar_ms=rttvar / 1000,
        min_rtt_ms=_ms(_get(raw, "min_rtt")),
        rto_ms=_req(raw, "rto") / 1000,
        cwnd=_req(raw, "snd_cwnd"),
        ssthresh=None if ssthresh >= INFINITE_SSTHRESH else ssthresh,
        snd_mss=_req(raw, "snd_mss"),
        rcv_mss=_req(raw, "rcv_mss"),
        unacked=_req(raw, "unacked"),
        sacked=_req(raw, "sacked"),
        lost=_req(raw, "lost"),
        retrans=_req(raw, "retrans"),
        total_retrans=_req(raw, "total_retrans"),
        snd_wnd=_get(raw, "snd_wnd"),
        rcv_wnd=_get(raw, "rcv_wnd"),
        rcv_space=_req(raw, "rcv_space"),
        snd_wscale=wscale & 0x0F,
        rcv_wscale=wscale >> 4,
        timestamps=bool(options & TCPI_OPT_TIMESTAMPS),
        sack=bool(options & TCPI_OPT_SACK),
        wscale=bool(options & TCPI_OPT_WSCALE),
        ecn=bool(options & TCPI_OPT_ECN),
        pacing_rate_bps=_bps(_get(raw, "pacing_rate")),
        delivery_rate_bps=_bps(_get(raw, "delivery_rate")),
        bytes_sent=_get(raw, "bytes_sent"),
        bytes_acked=_get(raw, "bytes_acked"),
        bytes_received=_get(raw, "bytes_received"),
        bytes_retrans=_get(raw, "bytes_retrans"),
        segs_out=_get(raw, "segs_out"),
        segs_in=_get(raw, "segs_in"),
        notsent_bytes=_get(raw, "notsent_bytes"),
        pmtu=_req(raw, "pmtu"),
        idle_ms=min(_req(raw, "last_data_sent"), _req(raw, "last_data_recv")),
    )
