"""Prometheus exposition for one balancer, read from its plain-int counters at scrape time.

The data path only bumps ints on Backend/ListenerStats; this collector turns them
into metric families when /metrics is scraped, so requests never touch
prometheus_client objects.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from balancer.lab.table import HANDSHAKE_BUCKETS, RTT_BUCKETS_MS, ConnTable
from balancer.lb.cluster import LATENCY_BUCKETS, Backend
from balancer.lb.health import STATES

ROLES = ("standalone", "active", "passive")
MODES = ("normal", "backup", "panic", "none")


class _Budget(Protocol):
    retries_allowed: int
    retries_denied: int


class _ClusterView(Protocol):
    backends: dict[str, Backend]
    mode: str

    @property
    def budget(self) -> _Budget: ...

    def state_of(self, backend: Backend) -> str: ...


class _Stats(Protocol):
    connections_total: int
    connections_open: int
    tls_handshakes: int
    requests_total: int
    bad_requests: int
    overload_rejections: int
    timeouts: int
    h2_connections_total: int
    h2_connections_open: int
    h2_streams_total: int
    h2_streams_open: int


class MetricsSource(Protocol):
    """What the collector reads at scrape time (balancer.app.Balancer is one)."""

    @property
    def cluster(self) -> _ClusterView: ...

    @property
    def stats(self) -> _Stats: ...

    @property
    def role(self) -> str: ...

    @property
    def role_detail(self) -> dict[str, Any]: ...

    @property
    def started_at(self) -> float: ...

    def worker_rows(self) -> list[dict[str, Any]]:
        """One row per worker process (`--workers N`); [] with one process."""
        ...


def histogram_buckets(counts: list[int], bounds: tuple[float, ...]) -> list[tuple[str, float]]:
    """Per-bucket counts (last one = above every bound) -> cumulative (le, count) pairs."""
    out: list[tuple[str, float]] = []
    running = 0
    for bound, n in zip(bounds, counts, strict=False):
        running += n
        out.append((repr(float(bound)), float(running)))
    out.append(("+Inf", float(sum(counts))))
    return out


class BalancerCollector(Collector):
    """Yields every `lb_*` family from one balancer's live counters."""

    def __init__(self, balancer: MetricsSource) -> None:
        self.balancer = balancer

    def collect(self) -> Iterator[Metric]:
        yield from self._backend_metrics()
        yield from self._overall_metrics()
        yield from self._worker_metrics()

    def _worker_metrics(self) -> Iterator[Metric]:
        rows = self.balancer.worker_rows()
        if not rows:
            return
        families = [
            (CounterMetricFamily, "lb_worker_requests", "Requests the worker served", "requests"),
            (GaugeMetricFamily, "lb_worker_connections_open", "Its client connections open now",
             "connections_open"),
            (CounterMetricFamily, "lb_worker_cpu_seconds", "CPU time of the worker process",
             "cpu_seconds"),
            (GaugeMetricFamily, "lb_worker_rss_bytes", "Resident memory of the worker process",
             "rss_bytes"),
            (CounterMetricFamily, "lb_worker_restarts", "Times the worker was restarted",
             "restarts"),
        ]  # fmt: skip
        for family, name, doc, key in families:
            metric = family(name, doc, labels=["worker"])
            for row in rows:
                metric.add_metric([str(row["index"])], float(row[key]))
            yield metric

    def _backend_metrics(self) -> Iterator[Metric]:
        cluster = self.balancer.cluster
        requests = CounterMetricFamily(
            "lb_backend_requests", "Requests sent to the backend", labels=["backend"]
        )
        responses = CounterMetricFamily(
            "lb_backend_responses",
            "Responses from the backend by status class",
            labels=["backend", "class"],
        )
        in_flight = GaugeMetricFamily(
            "lb_backend_in_flight", "Requests currently at the backend", labels=["backend"]
        )
        duration = HistogramMetricFamily(
            "lb_backend_request_duration_seconds",
            "Time from request sent to response head, per backend",
            labels=["backend"],
        )
        up = GaugeMetricFamily(
            "lb_backend_up", "1 if the backend takes new requests (state up)", labels=["backend"]
        )
        state = GaugeMetricFamily(
            "lb_backend_state", "1 for the backend's current state", labels=["backend", "state"]
        )
        ejections = CounterMetricFamily(
            "lb_backend_ejections", "Outlier ejections of the backend", labels=["backend"]
        )
        retries = CounterMetricFamily(
            "lb_backend_retries", "Requests retried after failing here", labels=["backend"]
        )
        errors = CounterMetricFamily(
            "lb_backend_errors", "Failed attempts by kind", labels=["backend", "kind"]
        )
        check = GaugeMetricFamily(
            "lb_backend_check_duration_seconds",
            "Duration of the last active check",
            labels=["backend"],
        )
        weight = GaugeMetricFamily(
            "lb_backend_weight", "Configured weight of the backend", labels=["backend"]
        )
        # the `backend` label of every family is the backend's name (its host:port when it
        # has none); lb_backend_info joins a name to its address without a second label
        info = GaugeMetricFamily(
            "lb_backend_info", "1 per backend: its name and address", labels=["backend", "address"]
        )
        # TCP mode: connections relayed, their bytes each way and their summed duration
        tcp_conns = CounterMetricFamily(
            "lb_backend_tcp_connections", "TCP-mode connections relayed", labels=["backend"]
        )
        tcp_bytes = CounterMetricFamily(
            "lb_backend_tcp_bytes",
            "TCP-mode bytes relayed (in: client to backend, out: backend to client)",
            labels=["backend", "direction"],
        )
        tcp_seconds = CounterMetricFamily(
            "lb_backend_tcp_connection_seconds",
            "Summed duration of the TCP-mode connections relayed",
            labels=["backend"],
        )
        for bid, b in list(cluster.backends.items()):
            tcp_conns.add_metric([bid], b.tcp_connections)
            tcp_bytes.add_metric([bid, "in"], b.tcp_bytes_in)
            tcp_bytes.add_metric([bid, "out"], b.tcp_bytes_out)
            tcp_seconds.add_metric([bid], b.tcp_seconds)
            info.add_metric([bid, b.address], 1.0)
            requests.add_metric([bid], b.requests)
            for i, n in enumerate(b.responses):
                if i:
                    responses.add_metric([bid, f"{i}xx"], n)
            in_flight.add_metric([bid], b.in_flight)
            duration.add_metric(
                [bid],
                buckets=histogram_buckets(list(b.latency), LATENCY_BUCKETS),
                sum_value=b.latency_sum,
            )
            current = cluster.state_of(b)
            up.add_metric([bid], 1.0 if current == "up" else 0.0)
            for s in STATES:
                state.add_metric([bid, s], 1.0 if s == current else 0.0)
            ejections.add_metric([bid], b.ejections)
            retries.add_metric([bid], b.retries)
            errors.add_metric([bid, "connect"], b.errors_connect)
            errors.add_metric([bid, "response"], b.errors_response)
            check.add_metric([bid], b.check_duration)
            weight.add_metric([bid], b.configured_weight)
        yield from (info, requests, responses, in_flight, duration, up, state)
        yield from (ejections, retries, errors, check, weight)
        yield from (tcp_conns, tcp_bytes, tcp_seconds)

    def _overall_metrics(self) -> Iterator[Metric]:
        bal = self.balancer
        stats = bal.stats
        for name, doc, value in (
            ("lb_connections", "Client connections accepted", stats.connections_total),
            ("lb_tls_handshakes", "Completed client TLS handshakes", stats.tls_handshakes),
            ("lb_requests", "Client requests received", stats.requests_total),
            ("lb_bad_requests", "Malformed client requests", stats.bad_requests),
            ("lb_overload_rejections", "Requests/connections refused", stats.overload_rejections),
            ("lb_timeouts", "Client or backend timeouts", stats.timeouts),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily(
            "lb_connections_open", "Client connections open now", value=stats.connections_open
        )
        budget = bal.cluster.budget
        retries = CounterMetricFamily(
            "lb_retry_budget_retries", "Retries the retry budget allowed or refused",
            labels=["outcome"],
        )  # fmt: skip
        retries.add_metric(["allowed"], budget.retries_allowed)
        retries.add_metric(["refused"], budget.retries_denied)
        yield retries
        # the protocol mix of the public listener: HTTP/1.1 is what is not HTTP/2
        h2_requests = stats.h2_streams_total
        for name, doc, h2, total, kind in (
            (
                "lb_protocol_connections",
                "Client connections accepted, by protocol",
                stats.h2_connections_total,
                stats.connections_total,
                CounterMetricFamily,
            ),
            (
                "lb_protocol_requests",
                "Client requests (HTTP/2: streams), by protocol",
                h2_requests,
                stats.requests_total,
                CounterMetricFamily,
            ),
            (
                "lb_protocol_connections_open",
                "Client connections open now, by protocol",
                stats.h2_connections_open,
                stats.connections_open,
                GaugeMetricFamily,
            ),
        ):
            family = kind(name, doc, labels=["listener", "protocol"])
            family.add_metric(["public", "HTTP/1.1"], total - h2)
            family.add_metric(["public", "HTTP/2"], h2)
            yield family
        yield GaugeMetricFamily(
            "lb_h2_streams_open", "HTTP/2 streams open now", value=stats.h2_streams_open
        )
        role = GaugeMetricFamily("lb_role", "1 for this balancer's current role", labels=["role"])
        roles = ROLES if bal.role in ROLES else (*ROLES, bal.role)
        for r in roles:
            role.add_metric([r], 1.0 if r == bal.role else 0.0)
        yield role
        yield CounterMetricFamily(
            "lb_role_transitions",
            "Role changes of this balancer",
            value=int(bal.role_detail.get("transitions", 0) or 0),
        )
        # lb_pool_mode is the old name of lb_cluster_mode, kept for existing dashboards
        for name, doc in (
            ("lb_cluster_mode", "1 for the cluster's current mode"),
            ("lb_pool_mode", "deprecated: use lb_cluster_mode"),
        ):
            mode = GaugeMetricFamily(name, doc, labels=["mode"])
            for m in MODES:
                mode.add_metric([m], 1.0 if m == bal.cluster.mode else 0.0)
            yield mode
        yield GaugeMetricFamily(
            "lb_start_time_seconds", "Unix time the balancer started", value=bal.started_at
        )


class LabCollector(Collector):
    """`lb_tcp_*` and `lb_tls_*` from the network lab's table. RTT samples are taken when a
    backend connection is looked at (API, dashboard: at most once a second) and when it
    closes, so the histogram counts samples, not requests."""

    def __init__(self, table: ConnTable) -> None:
        self.table = table

    def collect(self) -> Iterator[Metric]:
        t = self.table
        rtt = HistogramMetricFamily(
            "lb_tcp_rtt_seconds",
            "Smoothed RTT of backend connections (TCP_INFO), sampled on look and at close",
            labels=["backend"],
        )
        retrans = CounterMetricFamily(
            "lb_tcp_retransmits",
            "Segments retransmitted on backend connections (TCP_INFO total_retrans)",
            labels=["backend"],
        )
        bounds = tuple(b / 1000 for b in RTT_BUCKETS_MS)
        for bid, agg in list(t.backends.items()):
            rtt.add_metric(
                [bid], buckets=histogram_buckets(agg.rtt, bounds), sum_value=agg.rtt_sum_ms / 1000
            )
            retrans.add_metric([bid], agg.retransmits)
        open_ = GaugeMetricFamily(
            "lb_tcp_connections", "Open connections the lab tracks", labels=["side"]
        )
        for side, n in t.open_by_side().items():
            open_.add_metric([side], n)
        duration = HistogramMetricFamily(
            "lb_tls_handshake_duration_seconds",
            "Client TLS handshakes, from the TCP accept to the handshake's end",
        )
        duration.add_metric(
            [],
            buckets=histogram_buckets(t.tls.duration, HANDSHAKE_BUCKETS),
            sum_value=t.tls.duration_sum,
        )
        kinds = CounterMetricFamily(
            "lb_tls_handshakes_by_kind",
            "Client TLS handshakes by version, cipher and resumption",
            labels=["version", "cipher", "resumption"],
        )
        for (version, cipher, resumed), n in list(t.tls.by_kind.items()):
            kinds.add_metric([version, cipher, "resumed" if resumed else "full"], n)
        yield from (rtt, retrans, open_, duration, kinds)


def make_registry(balancer: MetricsSource, table: ConnTable | None = None) -> CollectorRegistry:
    """A registry of its own per balancer: tests run several in one process."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BalancerCollector(balancer))
    if table is not None:
        registry.register(LabCollector(table))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    data: bytes = generate_latest(registry)
    return data
