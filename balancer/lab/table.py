"""The connection table: one record per open connection, client side and backend side,
and the per-backend TCP and TLS aggregates the metrics read. Pure: the driver
(`balancer.io.lab`) reads the sockets and hands the decoded facts in.

Nothing here runs per request: a record is made when a connection opens, sampled when
someone looks (the API, the dashboard, at most once a second) and once when it closes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Literal

from balancer.lab.syn import SynInfo
from balancer.lab.tcpinfo import TcpInfo

Side = Literal["client", "backend"]
Closer = Literal["balancer", "peer", "reset"]
# smoothed RTT, milliseconds: loopback (~0.05) up to a slow WAN path
RTT_BUCKETS_MS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0)
# TLS handshake, seconds (from the TCP accept to the handshake's end)
HANDSHAKE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
HISTORY = 120  # samples kept per connection (two minutes at the dashboard's 1 s)
CLOSED_KEPT = 200  # recently closed connections kept for the API


def observe(counts: list[int], bounds: tuple[float, ...], value: float) -> None:
    for i, bound in enumerate(bounds):
        if value <= bound:
            counts[i] += 1
            return
    counts[-1] += 1


class TlsFacts:
    __slots__ = ("alpn", "cipher", "handshake_s", "resumed", "sni", "version")

    def __init__(
        self,
        version: str,
        cipher: str,
        alpn: str | None,
        sni: str | None,
        resumed: bool,
        handshake_s: float,
    ) -> None:
        self.version = version
        self.cipher = cipher
        self.alpn = alpn
        self.sni = sni
        self.resumed = resumed
        self.handshake_s = handshake_s

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "cipher": self.cipher,
            "alpn": self.alpn,
            "sni": self.sni,
            "resumed": self.resumed,
            "handshake_ms": round(self.handshake_s * 1000, 3),
        }


class ConnRecord:
    """One connection as the lab sees it. `sock` is the driver's (anything with
    getsockopt); the table only keeps it."""

    __slots__ = (
        "backend",
        "closed_at",
        "congestion",
        "fin",
        "history",
        "id",
        "info",
        "info_at",
        "opened_at",
        "peer",
        "retrans_seen",
        "side",
        "sock",
        "syn",
        "syn_error",
        "tls",
    )

    def __init__(
        self, cid: int, side: Side, peer: str, sock: Any, backend: str | None, now: float
    ) -> None:
        self.id = cid
        self.side: Side = side
        self.peer = peer
        self.sock = sock
        self.backend = backend
        self.opened_at = now
        self.closed_at: float | None = None
        self.fin: Closer | None = None  # who sent the first FIN (or reset the connection)
        self.tls: TlsFacts | None = None
        self.info: TcpInfo | None = None
        self.info_at = -1e18
        self.history: deque[tuple[float, float, int, int, int]] = deque(maxlen=HISTORY)
        self.retrans_seen = 0
        self.syn: SynInfo | None = None
        self.syn_error: str | None = None  # why there is no SYN (read once)
        self.congestion: str | None = None

    def time_wait(self) -> str | None:
        """Which side holds TIME_WAIT: the one that sent the first FIN (a reset: neither)."""
        if self.fin == "balancer":
            return "balancer"
        if self.fin == "peer":
            return "peer"
        return None

    def view(self, now: float, wall: float, history: bool = False) -> dict[str, Any]:
        end = self.closed_at if self.closed_at is not None else now
        info = self.info
        d: dict[str, Any] = {
            "id": self.id,
            "side": self.side,
            "backend": self.backend,
            "peer": self.peer,
            "age_s": round(end - self.opened_at, 3),
            "opened": round(wall - (now - self.opened_at), 3),
            "open": self.closed_at is None,
            # a closed one keeps its last reading, but its state is over
            "state": "CLOSED" if self.closed_at is not None else (info and info.state),
            "congestion": self.congestion,
            "first_fin": self.fin,
            "time_wait": self.time_wait(),
            "sampled_age_s": round(now - self.info_at, 3) if info is not None else None,
        }
        if info is not None:
            d.update(tcp_fields(info))
        if self.side == "client":
            d["tls"] = self.tls.as_dict() if self.tls is not None else None
            d["syn"] = self.syn.as_dict() if self.syn is not None else None
            if self.syn is None:
                d["syn_error"] = self.syn_error
        if history:
            d["history"] = [
                {
                    "t": round(wall - (now - t), 3),
                    "rtt_ms": r,
                    "cwnd": c,
                    "total_retrans": tr,
                    "unacked": u,
                }
                for t, r, c, tr, u in self.history
            ]
            d["tcp_info"] = info.as_dict() if info is not None else None
        return d


def tcp_fields(info: TcpInfo) -> dict[str, Any]:
    """The TCP_INFO fields the connection list shows (the issue's names)."""
    return {
        "rtt_ms": info.rtt_ms,
        "rttvar_ms": info.rttvar_ms,
        "cwnd": info.cwnd,
        "ssthresh": info.ssthresh,
        "total_retrans": info.total_retrans,
        "lost": info.lost,
        "unacked": info.unacked,
        "snd_wnd": info.snd_wnd,
        "rcv_wnd": info.rcv_wnd,
        "rcv_space": info.rcv_space,
        "delivery_rate_bps": info.delivery_rate_bps,
        "bytes_sent": info.bytes_sent,
        "bytes_received": info.bytes_received,
        "ca_state": info.ca_state,
        "idle_ms": info.idle_ms,
    }


class BackendTcp:
    """A backend's TCP aggregates: RTT histogram (ms) of samples, retransmits counter."""

    __slots__ = ("retransmits", "rtt", "rtt_count", "rtt_sum_ms")

    def __init__(self) -> None:
        self.rtt = [0] * (len(RTT_BUCKETS_MS) + 1)
        self.rtt_sum_ms = 0.0
        self.rtt_count = 0
        self.retransmits = 0


class TlsStats:
    __slots__ = ("by_kind", "duration", "duration_sum")

    def __init__(self) -> None:
        self.duration = [0] * (len(HANDSHAKE_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.by_kind: dict[tuple[str, str, bool], int] = {}  # (version, cipher, resumed)


class ConnTable:
    """`first_id`/`id_step`: worker i of n numbers its records i+1, i+1+n, ... so that an
    id is unique across workers and names the worker that holds it."""

    def __init__(self, clock: Callable[[], float], first_id: int = 1, id_step: int = 1) -> None:
        self.clock = clock
        self.open: dict[int, ConnRecord] = {}
        self.closed: deque[ConnRecord] = deque(maxlen=CLOSED_KEPT)
        self.next_id = first_id
        self.id_step = id_step
        self.backends: dict[str, BackendTcp] = {}
        self.tls = TlsStats()
        self.others_open: dict[str, int] = {}  # a supervisor: its workers' open records
        self.changes = 0  # bumped when an aggregate or the open set changes

    def add(self, side: Side, peer: str, sock: Any, backend: str | None = None) -> ConnRecord:
        rec = ConnRecord(self.next_id, side, peer, sock, backend, self.clock())
        self.next_id += self.id_step
        self.open[rec.id] = rec
        self.changes += 1
        return rec

    def open_by_side(self) -> dict[str, int]:
        """Open records by side: this table's and, in a supervisor, its workers'."""
        sides = {"client": self.others_open.get("client", 0)}
        sides["backend"] = self.others_open.get("backend", 0)
        for rec in list(self.open.values()):
            sides[rec.side] += 1
        return sides

    def tls_done(self, rec: ConnRecord, facts: TlsFacts) -> None:
        rec.tls = facts
        self.changes += 1
        t = self.tls
        observe(t.duration, HANDSHAKE_BUCKETS, facts.handshake_s)
        t.duration_sum += facts.handshake_s
        key = (facts.version, facts.cipher, facts.resumed)
        t.by_kind[key] = t.by_kind.get(key, 0) + 1

    def fin(self, rec: ConnRecord, who: Closer) -> None:
        if rec.fin is None:
            rec.fin = who

    def sample(self, rec: ConnRecord, info: TcpInfo, now: float) -> None:
        """A TCP_INFO reading of `rec`: kept, added to its history and the aggregates."""
        rec.info = info
        rec.info_at = now
        rec.history.append((now, info.rtt_ms, info.cwnd, info.total_retrans, info.unacked))
        if rec.backend is None or rec.side != "backend":
            return
        self.changes += 1
        agg = self.backends.get(rec.backend)
        if agg is None:
            agg = self.backends[rec.backend] = BackendTcp()
        if info.rtt_ms > 0:
            observe(agg.rtt, RTT_BUCKETS_MS, info.rtt_ms)
            agg.rtt_sum_ms += info.rtt_ms
            agg.rtt_count += 1
        if info.total_retrans > rec.retrans_seen:
            agg.retransmits += info.total_retrans - rec.retrans_seen
            rec.retrans_seen = info.total_retrans

    def backend_summary(self) -> dict[str, dict[str, Any]]:
        """Per backend: retransmits so far and the RTT samples' mean (ms)."""
        return {
            bid: {
                "retransmits": a.retransmits,
                "rtt_samples": a.rtt_count,
                "rtt_mean_ms": round(a.rtt_sum_ms / a.rtt_count, 3) if a.rtt_count else None,
            }
            for bid, a in self.backends.items()
        }

    def tls_summary(self) -> dict[str, Any]:
        """The TLS mix: handshakes by version, cipher and resumption, and their durations."""
        t = self.tls
        total = sum(t.by_kind.values())
        resumed = sum(n for (_, _, r), n in t.by_kind.items() if r)
        return {
            "handshakes": total,
            "resumed": resumed,
            "mean_ms": round(t.duration_sum / total * 1000, 3) if total else None,
            "kinds": [
                {"version": v, "cipher": c, "resumed": r, "count": n}
                for (v, c, r), n in sorted(t.by_kind.items(), key=lambda kv: -kv[1])
            ],
            "duration_bounds_s": list(HANDSHAKE_BUCKETS),
            "duration_buckets": list(t.duration),
        }

    def remove(self, rec: ConnRecord) -> None:
        if self.open.pop(rec.id, None) is None:
            return
        self.changes += 1
        rec.closed_at = self.clock()
        rec.sock = None
        self.closed.append(rec)

    def get(self, cid: int) -> ConnRecord | None:
        rec = self.open.get(cid)
        if rec is not None:
            return rec
        for old in self.closed:
            if old.id == cid:
                return old
        return None

    def __iter__(self) -> Iterator[ConnRecord]:
        return iter(list(self.open.values()))

    def __len__(self) -> int:
        return len(self.open)
