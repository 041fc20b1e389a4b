"""Rows of the admin API's `/api/state` (pure: read from the cluster and the listeners)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from balancer.config import ListenerSettings
from balancer.lb.cluster import Cluster
from balancer.lb.health import RetryBudget
from balancer.tcp.relay import TcpContext


def listener_rows(
    listeners: Sequence[ListenerSettings],
    bound: Sequence[tuple[str, str, int]],
    tcp: Sequence[TcpContext],
) -> list[dict[str, Any]]:
    """One row per public listener, in order; TCP-mode ones with their connection counts."""
    contexts = iter(tcp)
    rows = []
    for i, lst in enumerate(listeners):
        row: dict[str, Any] = {
            "configured": lst.listen,
            "mode": lst.mode,
            "accept_proxy": list(lst.accept_proxy),
            "bound": f"{bound[i][1]}:{bound[i][2]}" if i < len(bound) else None,
        }
        if lst.mode == "http":
            row["protocols"] = ["HTTP/1.1", "HTTP/2"] if lst.http2 else ["HTTP/1.1"]
        if lst.mode == "tcp":
            st = next(contexts).stats
            row["connections"] = {
                "open": st.connections_open,
                "total": st.connections_total,
                "refused": st.refused,
                "bytes_in": st.bytes_in,
                "bytes_out": st.bytes_out,
            }
        rows.append(row)
    return rows


def budget_row(budget: RetryBudget) -> dict[str, int]:
    """The retry budget's outcomes; with --workers, the sums over every worker."""
    return {"allowed": budget.retries_allowed, "refused": budget.retries_denied}


def backend_rows(
    cluster: Cluster, pool_counts: Callable[[str], tuple[int, int]]
) -> list[dict[str, Any]]:
    out = []
    for b in cluster.backends.values():
        connections, idle = pool_counts(b.id)
        out.append(
            {
                "id": b.id,  # the name; kept for API clients that read `id`
                "name": b.id,
                "address": b.address,
                "state": cluster.state_of(b),
                "admin_state": b.admin_state,
                "backup": b.backup,
                "weight": b.configured_weight,
                "effective_weight": round(b.weight, 3),
                "in_flight": b.in_flight,
                "connections": connections,
                "idle_connections": idle,
                "requests": b.requests,
                "responses": {f"{i}xx": n for i, n in enumerate(b.responses) if i},
                "errors": {"connect": b.errors_connect, "response": b.errors_response},
                "retries": b.retries,
                "ejections": b.ejections,
                "last_check": {
                    "ok": b.last_check,
                    "detail": b.check_detail,
                    "duration_ms": round(b.check_duration * 1000, 2),
                },
                "latency_buckets": list(b.latency),
                "tcp": {
                    "connections": b.tcp_connections,
                    "bytes_in": b.tcp_bytes_in,
                    "bytes_out": b.tcp_bytes_out,
                    "seconds": round(b.tcp_seconds, 3),
                },
                "discovered": b.discovered,
            }
        )
    return out
