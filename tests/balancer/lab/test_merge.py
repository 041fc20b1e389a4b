"""The network lab across workers (pure): interleaved ids name their worker, the workers'
aggregates sum into the supervisor's table, their records merge into one list."""

from __future__ import annotations

import json
from dataclasses import replace

from lab_layout import layout

from balancer.lab.merge import (
    add_aggregates,
    aggregates,
    id_scheme,
    merge_rows,
    owner,
    write_aggregates,
)
from balancer.lab.table import RTT_BUCKETS_MS, ConnTable, TlsFacts
from balancer.lab.tcpinfo import decode

INFO = decode(layout(280, rtt=2_000, snd_cwnd=10, total_retrans=0))
TLS13 = ("TLSv1.3", "TLS_AES_256_GCM_SHA384")


def clock() -> float:
    return 50.0


def worker_table(index: int, workers: int) -> ConnTable:
    first, step = id_scheme(index, workers)
    return ConnTable(clock, first_id=first, id_step=step)


def test_interleaved_ids_are_unique_and_name_their_worker() -> None:
    tables = [worker_table(i, 3) for i in range(3)]
    ids: dict[int, int] = {}
    for _ in range(4):
        for i, t in enumerate(tables):
            ids[t.add("client", "127.0.0.1:1", None).id] = i
    assert len(ids) == 12 and min(ids) == 1
    assert all(owner(cid, 3) == i for cid, i in ids.items())
    # one worker: the numbering of a single process
    single = worker_table(0, 1)
    assert [single.add("client", "x:1", None).id for _ in range(3)] == [1, 2, 3]


def test_aggregates_of_two_workers_sum_into_the_supervisors_table() -> None:
    w0, w1 = worker_table(0, 2), worker_table(1, 2)
    a = w0.add("backend", "10.0.0.1:80", None, "b1")
    w0.sample(a, replace(INFO, total_retrans=2), clock())
    b = w1.add("backend", "10.0.0.1:80", None, "b1")
    w1.sample(b, replace(INFO, rtt_ms=60.0, total_retrans=3), clock())
    c = w1.add("backend", "10.0.0.2:80", None, "b2")
    w1.sample(c, INFO, clock())
    client = w1.add("client", "127.0.0.1:5", None)
    w0.tls_done(w0.add("client", "127.0.0.1:6", None), TlsFacts(*TLS13, None, None, False, 0.002))
    w1.tls_done(client, TlsFacts(*TLS13, None, None, False, 0.004))
    w1.tls_done(client, TlsFacts(*TLS13, None, None, True, 0.001))

    total: dict[str, object] = {}
    for t in (w0, w1):  # through JSON, as over the socketpair
        add_aggregates(total, json.loads(json.dumps(aggregates(t))))
    sup = ConnTable(clock)
    write_aggregates(total, sup)

    b1 = sup.backends["b1"]
    assert b1.rtt_count == 2 and b1.retransmits == 5
    assert b1.rtt[RTT_BUCKETS_MS.index(2.5)] == 1 and b1.rtt[RTT_BUCKETS_MS.index(100.0)] == 1
    assert sup.backends["b2"].rtt_count == 1 and sup.backends["b2"].retransmits == 0
    assert sup.tls.by_kind == {(*TLS13, False): 2, (*TLS13, True): 1}
    assert sum(sup.tls.duration) == 3
    assert abs(sup.tls.duration_sum - 0.007) < 1e-9
    assert sup.open_by_side() == {"client": 2, "backend": 3}
    summary = sup.tls_summary()
    assert summary["handshakes"] == 3 and summary["resumed"] == 1


def test_a_retired_workers_totals_stay_but_its_open_records_do_not() -> None:
    w = worker_table(0, 2)
    rec = w.add("backend", "10.0.0.1:80", None, "b1")
    w.sample(rec, replace(INFO, total_retrans=4), clock())
    retired: dict[str, object] = {}
    add_aggregates(retired, dict(aggregates(w), open={}))  # as the supervisor keeps it
    sup = ConnTable(clock)
    write_aggregates(retired, sup)
    assert sup.backends["b1"].retransmits == 4
    assert sup.open_by_side() == {"client": 0, "backend": 0}


def test_changes_count_what_the_report_carries() -> None:
    t = worker_table(0, 1)
    seen = t.changes
    rec = t.add("client", "127.0.0.1:5", None)
    assert t.changes > seen
    seen = t.changes
    t.sample(rec, INFO, clock())  # a client sample feeds no aggregate
    assert t.changes == seen
    t.remove(rec)
    assert t.changes > seen


def test_rows_merge_by_id_and_closed_ones_most_recent_first() -> None:
    w0_closed = [{"id": 3, "opened": 1.0, "age_s": 9.0}]  # closed at 10
    w1_closed = [{"id": 4, "opened": 2.0, "age_s": 1.0}]  # closed at 3
    replies = [
        {"pid": 10, "connections": [{"id": 1}, {"id": 5}], "closed": w0_closed},
        {"pid": 11, "connections": [{"id": 2}], "closed": w1_closed},
        {},  # a worker that did not answer
    ]
    assert [r["id"] for r in merge_rows(replies, "connections")] == [1, 2, 5]
    assert [r["id"] for r in merge_rows(replies, "closed")] == [3, 4]
