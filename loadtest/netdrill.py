"""Drills that change the network: `tc netem` on one backend's traffic (delay, loss, a
rate limit), and what TCP did about it, read from the balancer's /api/connections.

The drill (loadtest.drill) applies the impairment at the fault time and clears it at the
restore time; meanwhile `sample_tcp` polls every balancer's /api/connections once a second
(each poll reads TCP_INFO of the balancer's connections: the network lab's cost, only
while a drill looks). `tcp_backends` turns the samples and the outcomes into the report's
`backends` field: per backend, the median RTT, the retransmits and the share of requests
before, during and after the fault, and RTT and cwnd over time.

Locally the victim backend runs in its own network namespace (harness.netns) and the qdisc
sits on the host end of its veth: what the balancer sends it (requests, ACKs) is delayed,
dropped or rate-limited, so the balancer's own sockets show the RTT and retransmits. In
compose a helper container joins the backend's namespace (loadtest.netem: the backend
keeps no NET_ADMIN) and impairs the backend's egress (its responses).
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from harness.traffic import Outcome
from loadtest.netem import Impairment

SAMPLE_INTERVAL_S = 1.0
SAMPLE_TIMEOUT_S = 1.0
ACTIVE_MS = 2000  # connections idle longer are left out of a sample's RTT and cwnd

# scenario -> the impairment its flags make (defaults as in the issue)
NETEM_SCENARIOS = ("delay-backend", "loss-backend", "bandwidth-backend")


def impairment_for(
    scenario: str,
    *,
    delay_ms: float = 50.0,
    jitter_ms: float = 0.0,
    loss_pct: float = 5.0,
    rate_kbit: int = 1000,
) -> Impairment:
    """The impairment of a netem scenario; ValueError (one line) for a bad value."""
    if scenario == "delay-backend":
        return Impairment(delay_ms=delay_ms, jitter_ms=jitter_ms)
    if scenario == "loss-backend":
        return Impairment(loss_pct=loss_pct)
    if scenario == "bandwidth-backend":
        return Impairment(rate_kbit=rate_kbit)
    raise ValueError(f"{scenario} is not a network drill")


@dataclass(frozen=True)
class TcpPoint:
    """One poll of one balancer, for one backend: its backend-side connections."""

    t: float
    backend: str
    connections: int
    rtt_ms: float | None  # median over its open connections
    cwnd: float | None  # mean over its open connections
    retransmits: int  # the balancer's counter for this backend (monotonic)


def points_from(t: float, body: dict[str, Any]) -> list[TcpPoint]:
    """The points of one /api/connections answer."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for r in body.get("connections", []):
        if r.get("side") != "backend" or not r.get("backend") or r.get("rtt_ms") is None:
            continue
        if (r.get("idle_ms") or 0) > ACTIVE_MS:
            continue  # a pooled connection unused for a while: its RTT and cwnd are stale
        rows.setdefault(r["backend"], []).append(r)
    counters = {b: int(v.get("retransmits", 0)) for b, v in body.get("backends", {}).items()}
    out = []
    for name in sorted(set(rows) | set(counters)):
        rs = rows.get(name, [])
        out.append(
            TcpPoint(
                t=t,
                backend=name,
                connections=len(rs),
                rtt_ms=statistics.median(r["rtt_ms"] for r in rs) if rs else None,
                cwnd=round(statistics.fmean(r["cwnd"] for r in rs), 2) if rs else None,
                retransmits=counters.get(name, 0),
            )
        )
    return out


async def sample_tcp(
    admins: dict[str, str],
    points: list[TcpPoint],
    clock: Callable[[], float],
    stop: asyncio.Event,
    max_polls: int,
) -> None:
    """Poll /api/connections of every balancer once a second until `stop` (bounded)."""
    timeout = aiohttp.ClientTimeout(total=SAMPLE_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for _ in range(max_polls):
            for url in admins.values():
                try:
                    async with session.get(url + "/api/connections") as resp:
                        if resp.status == 200:
                            points.extend(points_from(clock(), await resp.json()))
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    pass  # a passive or busy balancer: the next poll tries again
            try:
                await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL_S)
                return
            except TimeoutError:
                continue


def _phase(t: float, t_f: float, t_r: float) -> str:
    return "before" if t < t_f else "during" if t < t_r else "after"


def _counter_at(series: Sequence[TcpPoint], t: float) -> int:
    """The retransmit counter as last seen at or before t (0 before the first sample)."""
    value = 0
    for p in series:
        if p.t > t:
            break
        value = p.retransmits
    return value


def tcp_backends(
    points: Sequence[TcpPoint],
    outcomes: Sequence[Outcome],
    *,
    t0: float,
    t_fault: float | None,
    t_restore: float | None,
) -> dict[str, dict[str, Any]]:
    """The report's `backends`: per backend name, relative to t0 (times in seconds)."""
    t_f = t_fault if t_fault is not None else float("inf")
    t_r = t_restore if t_restore is not None else float("inf")
    names = sorted({p.backend for p in points} | {o.backend for o in outcomes if o.backend})
    ok = [o for o in outcomes if o.ok and o.backend]
    totals = {ph: sum(1 for o in ok if _phase(o.t_send - t0, t_f, t_r) == ph) for ph in PHASES}
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        series = sorted((p for p in points if p.backend == name), key=lambda p: p.t)
        rel = [(p.t - t0, p) for p in series]
        rtt = {
            ph: _median([p.rtt_ms for t, p in rel if _phase(t, t_f, t_r) == ph]) for ph in PHASES
        }
        first = series[0].t if series else t0
        marks = {"before": (first, t0 + t_f), "during": (t0 + t_f, t0 + t_r),
                 "after": (t0 + t_r, float("inf"))}  # fmt: skip
        retrans = {
            ph: max(0, _counter_at(series, b) - _counter_at(series, a))
            if a != float("inf") else 0
            for ph, (a, b) in marks.items()
        }  # fmt: skip
        mine = [o for o in ok if o.backend == name]
        share = {
            ph: round(sum(1 for o in mine if _phase(o.t_send - t0, t_f, t_r) == ph) / n, 3)
            if (n := totals[ph]) else None
            for ph in PHASES
        }  # fmt: skip
        out[name] = {
            "rtt_ms": rtt,
            "retransmits": retrans,
            "share": share,
            "cwnd": [[round(t, 2), p.cwnd] for t, p in rel],
            "rtt_series": [[round(t, 2), p.rtt_ms] for t, p in rel],
        }
    return out


PHASES = ("before", "during", "after")


def _median(values: Sequence[float | None]) -> float | None:
    vs = [v for v in values if v is not None]
    return round(statistics.median(vs), 3) if vs else None
