"""/metrics: a scrape reflects the balancer's counters exactly."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from balancer.admin.metrics import histogram_buckets
from balancer.app import Balancer
from balancer.config import AdminSettings, BackendSpec
from balancer.lb.cluster import LATENCY_BUCKETS
from harness import RunningBackend, run_backend

TIMEOUT = aiohttp.ClientTimeout(total=10)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
async def backends() -> AsyncIterator[list[RunningBackend]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(run_backend(f"m{i}")) for i in range(2)]


async def start(
    start_balancer: Callable[..., Awaitable[Balancer]], backends: list[RunningBackend]
) -> Balancer:
    return await start_balancer(
        [BackendSpec(b.host, b.port) for b in backends],
        admin=AdminSettings(listen="127.0.0.1:0"),
    )


async def scrape(bal: Balancer) -> Samples:
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
        s.get(bal.admin.url + "/metrics") as resp,
    ):
        assert resp.status == 200
        text = await resp.text()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def get(bal: Balancer, path: str, n: int) -> None:
    host, port = bal.address
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for _ in range(n):
            async with s.get(f"http://{host}:{port}{path}") as resp:
                await resp.read()


def b(backend: RunningBackend, **labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"backend": f"{backend.host}:{backend.port}", **labels}.items()))


async def test_counters_match_requests_sent(
    start_balancer: Callable[..., Awaitable[Balancer]], backends: list[RunningBackend]
) -> None:
    bal = await start(start_balancer, backends)
    await get(bal, "/", 10)
    await get(bal, "/status/404", 4)
    m = await scrape(bal)
    assert m[("lb_requests_total", ())] == 14
    assert m[("lb_connections_total", ())] >= 1
    assert m[("lb_bad_requests_total", ())] == 0
    assert m[("lb_overload_rejections_total", ())] == 0
    assert m[("lb_tls_handshakes_total", ())] == 0
    assert ("lb_connections_open", ()) in m
    for be in backends:
        assert m[("lb_backend_requests_total", b(be))] == 7
        assert m[("lb_backend_responses_total", b(be, **{"class": "2xx"}))] == 5
        assert m[("lb_backend_responses_total", b(be, **{"class": "4xx"}))] == 2
        assert m[("lb_backend_responses_total", b(be, **{"class": "5xx"}))] == 0
        assert m[("lb_backend_request_duration_seconds_count", b(be))] == 7
        assert m[("lb_backend_request_duration_seconds_bucket", b(be, le="+Inf"))] == 7
        assert 0 < m[("lb_backend_request_duration_seconds_sum", b(be))] < 7 * 10
        assert m[("lb_backend_in_flight", b(be))] == 0
        assert m[("lb_backend_up", b(be))] == 1
        assert m[("lb_backend_state", b(be, state="up"))] == 1
        assert m[("lb_backend_state", b(be, state="down"))] == 0
        assert m[("lb_backend_errors_total", b(be, kind="connect"))] == 0
    assert m[("lb_role", (("role", "standalone"),))] == 1
    assert m[("lb_role", (("role", "active"),))] == 0
    assert m[("lb_role_transitions_total", ())] == 0
    # the cluster mode, under its new name and (deprecated) its old one
    for name in ("lb_cluster_mode", "lb_pool_mode"):
        assert m[(name, (("mode", "normal"),))] == 1
        assert m[(name, (("mode", "panic"),))] == 0


async def test_renamed_metric_says_deprecated_in_its_help(
    start_balancer: Callable[..., Awaitable[Balancer]], backends: list[RunningBackend]
) -> None:
    bal = await start(start_balancer, backends)
    async with (
        aiohttp.ClientSession(timeout=TIMEOUT) as s,
        s.get(bal.admin.url + "/metrics") as resp,
    ):
        text = await resp.text()
    assert "# HELP lb_pool_mode deprecated: use lb_cluster_mode" in text
    assert "# HELP lb_cluster_mode 1 for the cluster's current mode" in text


async def test_each_balancer_has_its_own_registry(
    start_balancer: Callable[..., Awaitable[Balancer]], backends: list[RunningBackend]
) -> None:
    first = await start(start_balancer, backends)
    second = await start(start_balancer, backends)
    await get(first, "/", 3)
    await get(second, "/", 5)
    assert (await scrape(first))[("lb_requests_total", ())] == 3
    assert (await scrape(second))[("lb_requests_total", ())] == 5


async def test_backend_state_and_failure_counters(
    start_balancer: Callable[..., Awaitable[Balancer]],
    backends: list[RunningBackend],
    pair_status: Callable[..., object],
) -> None:
    bal = await start(start_balancer, backends)
    one = bal.cluster.backends[f"{backends[0].host}:{backends[0].port}"]
    # the collector only reads: bump the data-path counters directly
    one.errors_connect, one.errors_response, one.retries, one.ejections = 2, 3, 4, 1
    one.check_duration = 0.25
    one.admin_state = "maint"
    bal.role = "active"
    bal.pair = pair_status({"transitions": 2})  # type: ignore[assignment]
    m = await scrape(bal)
    assert m[("lb_backend_errors_total", b(backends[0], kind="connect"))] == 2
    assert m[("lb_backend_errors_total", b(backends[0], kind="response"))] == 3
    assert m[("lb_backend_retries_total", b(backends[0]))] == 4
    assert m[("lb_backend_ejections_total", b(backends[0]))] == 1
    assert m[("lb_backend_check_duration_seconds", b(backends[0]))] == 0.25
    assert m[("lb_backend_up", b(backends[0]))] == 0
    assert m[("lb_backend_state", b(backends[0], state="maint"))] == 1
    assert m[("lb_backend_state", b(backends[0], state="up"))] == 0
    assert m[("lb_backend_up", b(backends[1]))] == 1
    assert m[("lb_role", (("role", "active"),))] == 1
    assert m[("lb_role", (("role", "standalone"),))] == 0
    assert m[("lb_role_transitions_total", ())] == 2


def test_histogram_buckets_are_cumulative() -> None:
    counts = [1, 0, 2] + [0] * (len(LATENCY_BUCKETS) - 3) + [4]
    pairs = histogram_buckets(counts, LATENCY_BUCKETS)
    assert pairs[0] == ("0.0005", 1.0)
    assert pairs[2] == ("0.0025", 3.0)
    assert pairs[-2] == ("10.0", 3.0)
    assert pairs[-1] == ("+Inf", 7.0)
    assert len(pairs) == len(LATENCY_BUCKETS) + 1
