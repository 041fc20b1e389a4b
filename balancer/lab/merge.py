"""The network lab across workers. Pure (no I/O, no clock).

Every worker keeps its own connection table (ids interleaved: worker i of n numbers its
records i+1, i+1+n, ..., so `owner` finds the worker from the id). The supervisor asks the
workers for their records when someone looks and merges the answers (`merge_rows`); the
workers' aggregates (RTT samples, retransmits, TLS handshakes, open records) ride in their
stats reports when they changed and are summed into the supervisor's table
(`aggregates` -> `add_aggregates` -> `write_aggregates`), which the metrics read.
"""

from __future__ import annotations

from typing import Any

from balancer.lab.table import BackendTcp, ConnTable, TlsStats


def id_scheme(index: int, workers: int) -> tuple[int, int]:
    """(first id, step) of worker `index`'s connection table."""
    return index + 1, workers


def owner(cid: int, workers: int) -> int:
    """The index of the worker whose table numbers connection `cid` (ids start at 1)."""
    return (cid - 1) % workers


def aggregates(table: ConnTable) -> dict[str, Any]:
    """A worker's lab totals since it started, in a message-friendly shape."""
    t = table.tls
    return {
        "backends": {
            bid: {
                "rtt": list(a.rtt),
                "rtt_sum_ms": a.rtt_sum_ms,
                "rtt_count": a.rtt_count,
                "retransmits": a.retransmits,
            }
            for bid, a in table.backends.items()
        },
        "tls": {
            "duration": list(t.duration),
            "duration_sum": t.duration_sum,
            "kinds": [[v, c, r, n] for (v, c, r), n in t.by_kind.items()],
        },
        "open": table.open_by_side(),
    }


def _add_list(have: list[int], mine: list[int]) -> None:
    if len(have) < len(mine):
        have.extend([0] * (len(mine) - len(have)))
    for i, v in enumerate(mine):
        have[i] += v


def add_aggregates(total: dict[str, Any], agg: dict[str, Any]) -> None:
    """Add one worker's `aggregates` into `total` (same shape)."""
    tback = total.setdefault("backends", {})
    for bid, a in agg.get("backends", {}).items():
        row = tback.setdefault(bid, {"rtt": [], "rtt_sum_ms": 0.0, "rtt_count": 0})
        _add_list(row["rtt"], a.get("rtt", []))
        row["rtt_sum_ms"] += a.get("rtt_sum_ms", 0.0)
        row["rtt_count"] += a.get("rtt_count", 0)
        row["retransmits"] = row.get("retransmits", 0) + a.get("retransmits", 0)
    ttls = total.setdefault("tls", {"duration": [], "duration_sum": 0.0, "kinds": []})
    tls = agg.get("tls", {})
    _add_list(ttls["duration"], tls.get("duration", []))
    ttls["duration_sum"] += tls.get("duration_sum", 0.0)
    kinds = {(v, c, r): n for v, c, r, n in ttls["kinds"]}
    for v, c, r, n in tls.get("kinds", []):
        kinds[(v, c, r)] = kinds.get((v, c, r), 0) + n
    ttls["kinds"] = [[v, c, r, n] for (v, c, r), n in kinds.items()]
    topen = total.setdefault("open", {})
    for side, n in agg.get("open", {}).items():
        topen[side] = topen.get(side, 0) + n


def write_aggregates(total: dict[str, Any], table: ConnTable) -> None:
    """Overwrite the supervisor's (otherwise empty) table aggregates with the workers'
    totals, so /metrics and /api/connections show them unchanged."""
    backends: dict[str, BackendTcp] = {}
    for bid, a in total.get("backends", {}).items():
        agg = BackendTcp()
        if len(a["rtt"]) == len(agg.rtt):
            agg.rtt[:] = a["rtt"]
        agg.rtt_sum_ms = a["rtt_sum_ms"]
        agg.rtt_count = a["rtt_count"]
        agg.retransmits = a.get("retransmits", 0)
        backends[bid] = agg
    table.backends = backends
    tls = TlsStats()
    t = total.get("tls", {})
    if len(t.get("duration", [])) == len(tls.duration):
        tls.duration[:] = t["duration"]
    tls.duration_sum = t.get("duration_sum", 0.0)
    tls.by_kind = {(str(v), str(c), bool(r)): int(n) for v, c, r, n in t.get("kinds", [])}
    table.tls = tls
    table.others_open = dict(total.get("open", {}))


def merge_rows(replies: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The workers' rows under `key` as one list: open connections by id, closed ones the
    most recent first (as one table lists them)."""
    rows = [row for reply in replies for row in reply.get(key, [])]
    if key == "closed":
        rows.sort(key=lambda r: r["opened"] + r["age_s"], reverse=True)
    else:
        rows.sort(key=lambda r: r["id"])
    return rows
