"""One view of the cluster: the supervisor's decisions as a snapshot, applied in workers;
the workers' counters, summed back in the supervisor. Pure (no I/O, no clock).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from balancer.config import BackendSpec
from balancer.lb.cluster import Backend, Cluster

# Backend counters a worker reports and the supervisor sums (ints, floats, lists of ints)
COUNTERS = (
    "requests",
    "errors_connect",
    "errors_response",
    "retries",
    "latency_sum",
    "tcp_connections",
    "tcp_bytes_in",
    "tcp_bytes_out",
    "tcp_seconds",
)
LISTS = ("responses", "latency")
# the retry budget's counters (cluster.budget), summed the same way
BUDGET = ("retries_allowed", "retries_denied")
# events a worker raises that the supervisor cannot see itself: it emits them again
FORWARDED = frozenset({"rescued"})


def snapshot(cluster: Cluster, now: float, slots: dict[str, int]) -> dict[str, Any]:
    """What every worker must agree on: membership, weights, admin state, health,
    ejections and the algorithm. `slots` maps backend ids to in-flight table columns."""
    rows = []
    for b in cluster.backends.values():
        rows.append(
            {
                "id": b.id,
                "host": b.host,
                "port": b.port,
                "weight": b.configured_weight,
                "backup": b.backup,
                "admin": b.admin_state,
                "up": b.check_up,
                "up_since": b.up_since,
                "ejected": cluster.outlier.is_ejected(b.id, now),
                "discovered": b.discovered,
                "slot": slots.get(b.id, -1),
            }
        )
    return {"type": "state", "algorithm": cluster.algorithm, "backends": rows}


def apply_snapshot(
    cluster: Cluster,
    snap: dict[str, Any],
    specs: dict[str, BackendSpec],
    placed: Callable[[Backend, int], None],
) -> tuple[set[str], list[Backend]]:
    """Make a worker's cluster match `snap`. Returns the ejected ids and the backends that
    went down with this snapshot (their in-flight requests are rescued by the caller).
    `specs` are the worker's configured backends by id (their TCP-mode options); others
    (discovered) are built from the address."""
    rows = {r["id"]: r for r in snap["backends"]}
    for bid in [b for b in cluster.backends if b not in rows]:
        cluster.remove(bid)
    went_down: list[Backend] = []
    for bid, row in rows.items():
        backend = cluster.backends.get(bid)
        if backend is None:
            name = None if bid == f"{row['host']}:{row['port']}" else bid
            spec = specs.get(bid) or BackendSpec(row["host"], row["port"], name=name)
            backend = cluster.add(spec, discovered=bool(row["discovered"]))
        if backend.configured_weight != row["weight"]:
            backend.set_weight(float(row["weight"]))
        backend.backup = bool(row["backup"])
        backend.admin_state = str(row["admin"])
        if backend.check_up and not row["up"]:
            went_down.append(backend)
        backend.check_up = bool(row["up"])
        backend.up_since = row["up_since"]
        placed(backend, int(row["slot"]))
    if snap["algorithm"] != cluster.algorithm:
        cluster.set_algorithm(str(snap["algorithm"]))
    cluster.invalidate()
    return {bid for bid, r in rows.items() if r["ejected"]}, went_down


def report(
    pid: int, stats: Any, backends: Iterable[Backend], extra: dict[str, Any], budget: Any = None
) -> dict[str, Any]:
    """A worker's counters as of now (totals since it started)."""
    return {
        "type": "stats",
        "pid": pid,
        "stats": {name: getattr(stats, name) for name in type(stats).__slots__},
        "backends": {
            b.id: {c: getattr(b, c) for c in COUNTERS} | {c: list(getattr(b, c)) for c in LISTS}
            for b in backends
        },
        "budget": {c: getattr(budget, c) for c in BUDGET} if budget is not None else {},
        **extra,
    }


def add_into(total: dict[str, Any], rep: dict[str, Any]) -> None:
    """Add one report's listener stats and backend counters into `total` (same shape)."""
    for section in ("stats", "budget"):
        tsum = total.setdefault(section, {})
        for name, value in rep.get(section, {}).items():
            tsum[name] = tsum.get(name, 0) + value
    tback = total.setdefault("backends", {})
    for bid, counters in rep.get("backends", {}).items():
        row = tback.setdefault(bid, {})
        for c in COUNTERS:
            row[c] = row.get(c, 0) + counters.get(c, 0)
        for c in LISTS:
            mine = counters.get(c, [])
            have = row.setdefault(c, [0] * len(mine))
            for i, v in enumerate(mine):
                have[i] += v


def write_totals(
    total: dict[str, Any], stats: Any, backends: dict[str, Backend], budget: Any = None
) -> None:
    """Overwrite the supervisor's (otherwise idle) counters with the workers' totals, so
    every existing view (/api/state, /metrics, the dashboard) shows them unchanged."""
    for name in type(stats).__slots__:
        setattr(stats, name, total.get("stats", {}).get(name, 0))
    if budget is not None:
        for name in BUDGET:
            setattr(budget, name, total.get("budget", {}).get(name, 0))
    for bid, counters in total.get("backends", {}).items():
        backend = backends.get(bid)
        if backend is None:
            continue
        for c in COUNTERS:
            setattr(backend, c, counters.get(c, 0))
        for c in LISTS:
            values = counters.get(c)
            current = getattr(backend, c)
            if values is not None and len(values) == len(current):
                current[:] = values
