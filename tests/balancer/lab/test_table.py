"""The connection table's records and aggregates, and the socket-state counts (pure)."""

from __future__ import annotations

from dataclasses import replace

from lab_layout import layout

from balancer.lab.states import SockRow, count, parse_netstat
from balancer.lab.table import RTT_BUCKETS_MS, ConnTable, TlsFacts
from balancer.lab.tcpinfo import decode

INFO = decode(layout(280, rtt=2_000, snd_cwnd=10, total_retrans=0))


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_samples_feed_the_backends_rtt_histogram_and_retransmit_deltas() -> None:
    clock = Clock()
    t = ConnTable(clock)
    rec = t.add("backend", "127.0.0.1:9001", None, "b1")
    t.sample(rec, INFO, clock())
    t.sample(rec, replace(INFO, total_retrans=3, rtt_ms=60.0), clock())
    t.sample(rec, replace(INFO, total_retrans=5, rtt_ms=60.0), clock())
    agg = t.backends["b1"]
    assert agg.retransmits == 5  # deltas, not the sum of readings
    assert agg.rtt_count == 3
    assert agg.rtt[RTT_BUCKETS_MS.index(2.5)] == 1 and agg.rtt[RTT_BUCKETS_MS.index(100.0)] == 2
    assert [h[2] for h in rec.history] == [10, 10, 10]


def test_client_records_do_not_touch_backend_aggregates_and_tls_is_counted() -> None:
    clock = Clock()
    t = ConnTable(clock)
    rec = t.add("client", "127.0.0.1:5555", None)
    t.sample(rec, INFO, clock())
    t.tls_done(rec, TlsFacts("TLSv1.3", "TLS_AES_256_GCM_SHA384", "http/1.1", "lb", True, 0.003))
    assert t.backends == {}
    assert t.tls.by_kind == {("TLSv1.3", "TLS_AES_256_GCM_SHA384", True): 1}
    assert sum(t.tls.duration) == 1
    view = rec.view(clock(), 1000.0)
    assert view["tls"]["resumed"] is True and view["tls"]["handshake_ms"] == 3.0
    assert view["rtt_ms"] == 2.0 and view["cwnd"] == 10


def test_the_first_fin_decides_who_holds_time_wait_and_closed_ones_are_kept() -> None:
    clock = Clock()
    t = ConnTable(clock)
    rec = t.add("client", "127.0.0.1:5555", None)
    t.fin(rec, "peer")
    t.fin(rec, "balancer")  # ours answers theirs: the first one stays
    clock.t += 2.5
    t.remove(rec)
    assert len(t) == 0 and t.get(rec.id) is rec
    view = rec.view(clock(), 1000.0)
    assert view["first_fin"] == "peer" and view["time_wait"] == "peer"
    assert view["open"] is False and view["age_s"] == 2.5
    reset = t.add("backend", "127.0.0.1:9001", None, "b1")
    t.fin(reset, "reset")
    assert reset.view(clock(), 1000.0)["time_wait"] is None


def test_socket_states_split_listener_and_backend_side() -> None:
    rows = [
        SockRow(10, "127.0.0.1", 8443, "0.0.0.0", 0, 3, 2048, 11),  # our listener
        SockRow(10, "127.0.0.1", 9999, "0.0.0.0", 0, 0, 128, 99),  # someone else's
        SockRow(1, "127.0.0.1", 8443, "127.0.0.1", 40000, 0, 0, 12),
        SockRow(12, "127.0.0.1", 8443, "127.0.0.1", 40001, 0, 0, 0),  # request socket
        SockRow(6, "127.0.0.1", 8443, "127.0.0.1", 40002, 0, 0, 0),  # TIME_WAIT, no inode
        SockRow(1, "127.0.0.1", 50000, "127.0.0.1", 9001, 0, 0, 13),
        SockRow(6, "::ffff:127.0.0.1", 50001, "::ffff:127.0.0.1", 9001, 0, 0, 0),
        SockRow(1, "127.0.0.1", 50002, "127.0.0.1", 9001, 0, 0, 77),  # another process's
    ]
    got = count(rows, {11, 12, 13}, {8443}, {("127.0.0.1", 9001)})
    assert got["listener"] == {"LISTEN": 1, "ESTABLISHED": 1, "SYN_RECV": 1, "TIME_WAIT": 1}
    assert got["backend"] == {"ESTABLISHED": 1, "TIME_WAIT": 1}
    assert got["listen_queues"] == [{"address": "127.0.0.1:8443", "queue": 3, "backlog": 2048}]


def test_netstat_pairs() -> None:
    text = (
        "TcpExt: SyncookiesSent ListenOverflows ListenDrops\n"
        "TcpExt: 0 7 9\n"
        "IpExt: InNoRoutes\n"
        "IpExt: x\n"
    )
    assert parse_netstat(text) == {
        "TcpExt.SyncookiesSent": 0,
        "TcpExt.ListenOverflows": 7,
        "TcpExt.ListenDrops": 9,
    }
