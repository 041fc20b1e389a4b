"""The pure parts of worker processes: the count, the message codec, the cluster snapshot
and the shared in-flight table with least connections over every worker's requests."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from balancer.config import BackendSpec, ConfigError, OutlierSettings, RetrySettings, from_args
from balancer.http1.exchange import ListenerStats
from balancer.lb.cluster import Backend, Cluster
from balancer.workers.codec import MAX_FRAME, Decoder, encode
from balancer.workers.count import quota_cores, resolve
from balancer.workers.shared import (
    InFlightTable,
    SharedBackend,
    SharedLeastConnections,
    SharedRetryBudget,
    worker_algorithm,
)
from balancer.workers.view import add_into, apply_snapshot, report, snapshot, write_totals


def cluster(specs: list[BackendSpec], algorithm: str = "round-robin") -> Cluster:
    return Cluster(
        specs,
        algorithm,
        clock=lambda: 100.0,
        rng=random.Random(1),
        outlier=OutlierSettings(),
        retries=RetrySettings(),
    )


SPECS = [BackendSpec("127.0.0.1", 9001 + i, name=f"b{i + 1}") for i in range(3)]


# --workers -------------------------------------------------------------------------------
def test_auto_is_the_affinity_mask_capped_by_the_cgroup_quota() -> None:
    assert resolve("auto", 8, None) == 8
    assert resolve("auto", 8, "max 100000") == 8
    assert resolve("auto", 8, "250000 100000") == 3  # 2.5 cores: rounded up
    assert resolve("auto", 2, "800000 100000") == 2
    assert resolve("auto", 0, None) == 1
    assert resolve("3", 8, "100000 100000") == 3  # a number is taken as given


def test_quota_text_not_understood_means_no_quota() -> None:
    assert quota_cores("") is None
    assert quota_cores("garbage") is None
    assert quota_cores("x 100000") is None
    assert quota_cores("50000 100000") == 1


B = ["--backend", "127.0.0.1:9001"]


def test_workers_flag() -> None:
    assert from_args(B).workers == "1"
    assert from_args([*B, "--workers", "auto"]).workers == "auto"
    assert from_args([*B, "--workers", "4"]).workers == "4"
    for bad in ("0", "-1", "two", "65"):
        with pytest.raises(ConfigError, match="workers"):
            from_args([*B, "--workers", bad])


def test_workers_in_toml_as_number_or_auto(tmp_path: Path) -> None:
    path = tmp_path / "lb.toml"
    path.write_text("workers = 2\n")
    assert from_args([*B, "--config", str(path)]).workers == "2"
    path.write_text('workers = "auto"\n')
    assert from_args([*B, "--config", str(path)]).workers == "auto"
    path.write_text("workers = true\n")
    with pytest.raises(ConfigError, match="workers"):
        from_args([*B, "--config", str(path)])


# codec -----------------------------------------------------------------------------------
def test_codec_reassembles_frames_split_anywhere() -> None:
    msgs = [{"type": "state", "n": i, "s": "é" * i} for i in range(5)]
    wire = b"".join(encode(m) for m in msgs)
    for step in (1, 3, 7, len(wire)):
        dec = Decoder()
        got = []
        for i in range(0, len(wire), step):
            got += dec.feed(wire[i : i + step])
        assert got == msgs


def test_codec_refuses_an_oversized_frame_and_a_typeless_message() -> None:
    with pytest.raises(ValueError, match="over"):
        Decoder().feed((MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(ValueError, match="type"):
        Decoder().feed(len(b"[1]").to_bytes(4, "big") + b"[1]")


# snapshot --------------------------------------------------------------------------------
def test_snapshot_carries_every_decision_to_a_worker() -> None:
    sup = cluster(SPECS, "least-connections")
    sup.backends["b1"].admin_state = "draining"
    sup.backends["b2"].check_up = False
    sup.backends["b3"].set_weight(5.0)
    for _ in range(5):
        sup.failure(sup.backends["b3"], "connect")  # consecutive failures: ejected
    sup.add(BackendSpec("10.0.0.9", 80), discovered=True)
    snap = snapshot(sup, 100.0, {"b1": 0, "b2": 1, "b3": 2})

    worker = cluster([SPECS[0], BackendSpec("127.0.0.1", 9999, name="gone")])
    worker.backends["b1"].in_flight = 1
    worker.backends["b1"].check_up = True
    placed: dict[str, int] = {}
    ejected, went_down = apply_snapshot(
        worker, snap, {s.id: s for s in SPECS}, lambda b, slot: placed.update({b.id: slot})
    )
    assert set(worker.backends) == {"b1", "b2", "b3", "10.0.0.9:80"}
    assert worker.backends["10.0.0.9:80"].discovered
    assert worker.backends["b1"].admin_state == "draining"
    assert worker.backends["b2"].check_up is False
    assert [b.id for b in went_down] == ["b2"]
    assert worker.backends["b3"].configured_weight == 5.0
    assert ejected == {"b3"}
    assert worker.algorithm == "least-connections"
    assert placed == {"b1": 0, "b2": 1, "b3": 2, "10.0.0.9:80": -1}


def test_counters_sum_over_workers_into_the_supervisor_views() -> None:
    reports = []
    for n in (3, 4):
        w = cluster(SPECS[:1])
        stats = ListenerStats()
        stats.requests_total = n
        stats.connections_open = 1
        w.backends["b1"].requests = n
        w.backends["b1"].observe(200, 0.002)
        reports.append(report(1, stats, w.backends.values(), {}))
    total: dict[str, object] = {}
    for r in reports:
        add_into(total, r)
    sup = cluster(SPECS[:1])
    stats = ListenerStats()
    write_totals(total, stats, sup.backends)
    assert stats.requests_total == 7
    assert stats.connections_open == 2
    assert sup.backends["b1"].requests == 7
    assert sup.backends["b1"].responses[2] == 2
    assert sum(sup.backends["b1"].latency) == 2


def test_retry_budget_outcomes_sum_over_workers() -> None:
    total: dict[str, object] = {}
    for allowed, denied in ((2, 0), (3, 5)):
        w = cluster(SPECS[:1])
        w.budget.retries_allowed, w.budget.retries_denied = allowed, denied
        add_into(total, report(1, ListenerStats(), w.backends.values(), {}, w.budget))
    add_into(total, report(1, ListenerStats(), [], {}))  # a report without them adds none
    sup = cluster(SPECS[:1])
    write_totals(total, ListenerStats(), sup.backends, sup.budget)
    assert (sup.budget.retries_allowed, sup.budget.retries_denied) == (5, 5)


# shared in-flight table ------------------------------------------------------------------
def test_least_connections_counts_every_workers_in_flight_requests() -> None:
    table = InFlightTable(2)
    try:
        views = []
        for w in range(2):
            c = cluster([])
            c.make_backend = lambda s, clock, ss, w=w: SharedBackend(s, clock, ss, table, w)
            c.algorithms = worker_algorithm
            c.set_algorithm("least-connections")
            for i, spec in enumerate(SPECS):
                b = c.add(spec)
                assert isinstance(b, SharedBackend)
                b.place(i)
            views.append(c)
        assert isinstance(views[0].scheduler, SharedLeastConnections)
        # worker 1 has two requests at b1 and one at b2; worker 0 has none anywhere
        views[1].backends["b1"].in_flight += 2
        views[1].backends["b2"].in_flight += 1
        assert views[0].backends["b1"].in_flight == 0  # its own count stays its own
        for _ in range(5):
            picked = views[0].pick(None)
            assert picked is not None and picked.id == "b3"
        views[0].backends["b3"].in_flight += 2  # now b2 (1 over all workers) is the least
        picked = views[0].pick(None)
        assert picked is not None and picked.id == "b2"
        table.clear_row(1)  # a restarted worker starts from zero
        assert isinstance(views[0].backends["b1"], SharedBackend)
        assert views[0].backends["b1"].total_in_flight() == 0
    finally:
        table.close()


def test_a_plain_backend_is_unchanged_with_one_worker() -> None:
    c = cluster(SPECS)
    assert type(c.backends["b1"]) is Backend


def test_the_retry_budget_counts_every_workers_requests_and_retries() -> None:
    table = InFlightTable(2)
    try:
        # 10 % of requests, no floor: retries are allowed only by requests
        a = SharedRetryBudget(table, 0, ratio=0.1, min_per_second=0.0)
        b = SharedRetryBudget(table, 1, ratio=0.1, min_per_second=0.0)
        assert not b.try_retry(100.0)  # nobody has served a request yet
        a.on_requests(100.0, 20)  # worker 0's requests...
        assert b.try_retry(100.5)  # ...give worker 1 a retry
        assert a.try_retry(100.6)  # and worker 0 the second of the two
        assert not a.try_retry(100.7)  # 2 retries of 20 requests: spent, over both
        assert not b.try_retry(100.8)
        assert not b.try_retry(111.0)  # the window moved past them: nothing left, no debt
        b.on_requests(111.0, 10)
        assert a.try_retry(111.1)
        table.clear_row(1)  # a restarted worker's counts go with it
        assert not a.try_retry(111.2)
    finally:
        table.close()
