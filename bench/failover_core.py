"""Pure parts of `make bench-failover`: keepalived config, probe-log parsing, timings, table.

No I/O here, so all of it is unit-tested (tests/bench/test_failover_parse.py).
"""

from __future__ import annotations

import ipaddress
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

EVENTS = ("kill", "stop")


@dataclass(frozen=True)
class Probe:
    """One HTTP GET from the client namespace: monotonic start/end, status, X-Backend."""

    start: float
    end: float
    status: int  # 0 = no HTTP answer (refused, timed out, reset)
    backend: str  # X-Backend of the answer, or the error kind

    @property
    def ok(self) -> bool:
        return self.status == 200

    def line(self) -> str:
        return f"{self.start:.6f} {self.end:.6f} {self.status} {self.backend}"


def parse_probe_line(line: str) -> Probe | None:
    """`START END STATUS BACKEND`; None for blank, comment or malformed lines."""
    parts = line.split()
    if len(parts) != 4 or line.lstrip().startswith("#"):
        return None
    try:
        start, end, status = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        return None
    if not (math.isfinite(start) and math.isfinite(end)) or end < start or status < 0:
        return None
    return Probe(start, end, status, parts[3])


def parse_probe_log(text: str) -> list[Probe]:
    probes = [p for p in (parse_probe_line(ln) for ln in text.splitlines()) if p is not None]
    return sorted(probes, key=lambda p: p.start)


@dataclass(frozen=True)
class Failover:
    failover_s: float  # event -> first answer from the new node
    last_old_s: float | None  # event -> last answer from the old node (negative: before)
    failed_probes: int  # probes that got no 200 between the event and recovery


def first_answer_from(probes: Iterable[Probe], backend: str, after: float) -> float | None:
    """When the first 200 from `backend` completed after `after` (monotonic), or None."""
    ends = [p.end for p in probes if p.ok and p.backend == backend and p.end >= after]
    return min(ends) if ends else None


def extract_failover(probes: Sequence[Probe], event_at: float, old: str, new: str) -> Failover:
    """Service recovery seen by the client; raises ValueError if the new node never answered."""
    recovered = first_answer_from(probes, new, event_at)
    if recovered is None:
        raise ValueError(f"no answer from {new!r} after the event")
    olds = [p.end for p in probes if p.ok and p.backend == old]
    failed = sum(1 for p in probes if not p.ok and event_at <= p.start <= recovered)
    return Failover(
        failover_s=recovered - event_at,
        last_old_s=(max(olds) - event_at) if olds else None,
        failed_probes=failed,
    )


def steady(probes: Sequence[Probe], backend: str, since: float, min_count: int) -> bool:
    """At least `min_count` probes started since `since`, all answered by `backend`."""
    recent = [p for p in probes if p.start >= since]
    return len(recent) >= min_count and all(p.ok and p.backend == backend for p in recent)


# ----- keepalived --------------------------------------------------------------------------


@dataclass(frozen=True)
class KeepalivedNode:
    name: str  # router_id
    interface: str
    address: str  # our own address (unicast source)
    peer: str
    priority: int
    vip: str  # ADDR/PREFIX
    advert_interval: float
    vrid: int = 51


def keepalived_version_for(interval: float) -> int:
    """VRRPv2 counts whole seconds; VRRPv3 has centiseconds (RFC 5798), needed below 1 s."""
    return 2 if interval >= 1 and float(interval).is_integer() else 3


def render_keepalived(node: KeepalivedNode) -> str:
    """A minimal unicast VRRP instance; ValueError on settings keepalived would reject."""
    if not 1 <= node.priority <= 254:
        raise ValueError(f"priority {node.priority} out of range 1-254")
    if not 1 <= node.vrid <= 255:
        raise ValueError(f"virtual router id {node.vrid} out of range 1-255")
    cs = round(node.advert_interval * 100)
    if cs < 1 or cs > 4095 or abs(cs - node.advert_interval * 100) > 1e-6:
        raise ValueError(f"advert interval {node.advert_interval} must be 0.01-40.95 s in 0.01 s")
    try:
        vip = ipaddress.ip_interface(node.vip)
        for addr in (node.address, node.peer):
            ipaddress.ip_address(addr)
    except ValueError as exc:
        raise ValueError(f"invalid address: {exc}") from None
    version = keepalived_version_for(node.advert_interval)
    interval = f"{node.advert_interval:g}"
    return (
        "global_defs {\n"
        f"    router_id {node.name}\n"
        f"    vrrp_version {version}\n"
        "    vrrp_garp_master_delay 5\n"
        "}\n"
        "vrrp_instance VI_1 {\n"
        "    state BACKUP\n"
        f"    interface {node.interface}\n"
        f"    virtual_router_id {node.vrid}\n"
        f"    priority {node.priority}\n"
        f"    advert_int {interval}\n"
        f"    unicast_src_ip {node.address}\n"
        "    unicast_peer {\n"
        f"        {node.peer}\n"
        "    }\n"
        "    virtual_ipaddress {\n"
        f"        {vip.with_prefixlen} dev {node.interface}\n"
        "    }\n"
        "}\n"
    )


def keepalived_master_down(interval: float, priority: int) -> float:
    """What keepalived's backup waits for (v2 skew is in seconds, v3 scales by interval)."""
    skew = (256 - priority) / 256
    if keepalived_version_for(interval) == 3:
        skew *= interval
    return 3 * interval + skew


# ----- results -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    system: str
    advert_interval: float
    event: str
    samples: tuple[float, ...]
    note: str = ""

    @property
    def failover_s(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    def as_dict(self) -> dict[str, Any]:
        med = self.failover_s
        out: dict[str, Any] = {
            "system": self.system,
            "advert_interval": self.advert_interval,
            "event": self.event,
            "failover_s": None if med is None else round(med, 4),
            "samples": [round(s, 4) for s in self.samples],
        }
        if self.note:
            out["note"] = self.note
        return out


def table(rows: Sequence[Row]) -> str:
    head = f"{'system':<12} {'advert_s':>8} {'event':<5} {'median_s':>9}  samples"
    lines = [head, "-" * len(head)]
    for r in rows:
        med = r.failover_s
        shown = "-" if med is None else f"{med:.3f}"
        samples = " ".join(f"{s:.3f}" for s in r.samples) or "-"
        note = f"  ({r.note})" if r.note else ""
        lines.append(
            f"{r.system:<12} {r.advert_interval:>8g} {r.event:<5} {shown:>9}  {samples}{note}"
        )
    return "\n".join(lines)
