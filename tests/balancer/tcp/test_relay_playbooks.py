"""Playbooks for the TCP-mode relay: `Relay` driven with recorded transport operations, a
fake clock and no sockets. The test plays the network: it feeds bytes, completes or refuses
the connects the relay asks for, and moves the clock."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from typing import Any

from hellos import client_hello
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.config import BackendSpec, Config, ListenerSettings
from balancer.lb.cluster import Backend, Cluster
from balancer.tcp.clienthello import UNRECOGNIZED_NAME_ALERT
from balancer.tcp.proxy import encode
from balancer.tcp.relay import HOLD_HIGH, Relay, TcpContext

CLIENT = ("198.51.100.7", 40000)
LOCAL = ("127.0.0.1", 8443)


class FakeEnd:
    """A transport: the operations asked of it, in order."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, bytes | None]] = []

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.ops.append(("write", data))

    def write_eof(self) -> None:
        self.ops.append(("eof", None))

    def pause_reading(self) -> None:
        self.ops.append(("pause", None))

    def resume_reading(self) -> None:
        self.ops.append(("resume", None))

    def close(self) -> None:
        self.ops.append(("close", None))

    def abort(self) -> None:
        self.ops.append(("abort", None))

    @property
    def closed(self) -> bool:
        return any(op in ("close", "abort") for op, _ in self.ops)

    def names(self) -> list[str]:
        return [op for op, _ in self.ops]

    def written(self) -> bytes:
        return b"".join(d for op, d in self.ops if op == "write" and d)


class Book:
    """A cluster and one TCP listener context; `connects` holds the opens asked for."""

    def __init__(self, specs: list[BackendSpec], **overrides: Any) -> None:
        listener = overrides.pop("listener", ListenerSettings(mode="tcp"))
        self.cfg = replace(Config(backends=tuple(specs)), **overrides)
        self.now = 100.0
        self.cluster = Cluster(
            self.cfg.backends,
            self.cfg.algorithm,
            clock=lambda: self.now,
            rng=random.Random(7),
            outlier=self.cfg.outlier,
            retries=self.cfg.retries,
        )
        self.connects: list[tuple[Relay, Backend, float, float]] = []
        self.log: list[dict[str, Any]] = []
        self.ctx = TcpContext(
            self.cfg,
            listener,
            self.cluster,
            clock=lambda: self.now,
            open=lambda relay, backend, timeout, delay: self.connects.append(
                (relay, backend, timeout, delay)
            ),
            access_log=lambda line: self.log.append(json.loads(line)),
            wallclock=lambda: 0.0,
        )

    def accept(self, peer: tuple[str, int] = CLIENT) -> tuple[Relay, FakeEnd]:
        end = FakeEnd()
        return Relay(self.ctx, end, peer, LOCAL), end

    def connect(self) -> tuple[Backend, FakeEnd]:
        """Complete the oldest connect asked for."""
        relay, backend, _, _ = self.connects.pop(0)
        end = FakeEnd()
        relay.backend_connected(end)
        return backend, end

    def refuse(self, kind: str = "connect") -> Backend:
        relay, backend, _, _ = self.connects.pop(0)
        relay.connect_failed(kind)
        return backend

    def sweep(self, seconds: float) -> None:
        self.now += seconds
        self.ctx.sweep(self.now)


A = BackendSpec("10.0.0.1", 80, name="a")
B = BackendSpec("10.0.0.2", 80, name="b")


def test_bytes_both_ways_and_half_close_carried_through() -> None:
    book = Book([A])
    relay, client = book.accept()
    assert book.connects[0][2] == book.cfg.timeouts.connect
    relay.client_data(b"early ")  # before the backend answered: held
    backend, up = book.connect()
    assert up.written() == b"early " and backend.in_flight == 1
    relay.client_data(b"request")
    relay.client_eof_received()  # the client's FIN is passed on ...
    assert up.names() == ["write", "write", "eof"]
    relay.backend_data(b"response 1")  # ... and the other direction keeps flowing
    relay.backend_data(b"response 2")
    assert client.written() == b"response 1response 2" and not client.closed
    relay.backend_eof_received()  # both FINs seen: both sides close
    assert client.names()[-2:] == ["eof", "close"] and up.names()[-1] == "close"
    assert backend.in_flight == 0 and backend.tcp_connections == 1
    assert (backend.tcp_bytes_in, backend.tcp_bytes_out) == (13, 20)
    [line] = book.log
    assert line["mode"] == "tcp" and line["backend"] == "a" and line["outcome"] == "closed"
    assert (line["bytes_in"], line["bytes_out"], line["client"]) == (13, 20, CLIENT[0])
    assert book.ctx.stats.connections_open == 0 and not book.ctx.relays


def test_backend_fin_first_keeps_the_client_direction_open() -> None:
    book = Book([A])
    relay, client = book.accept()
    _, up = book.connect()
    relay.backend_eof_received()
    assert client.names() == ["eof"]
    relay.client_data(b"more")
    assert up.written() == b"more" and not up.closed
    relay.client_eof_received()
    assert up.names()[-2:] == ["eof", "close"] and client.closed


def test_client_fin_before_connect_is_sent_after_the_held_bytes() -> None:
    book = Book([A])
    relay, _ = book.accept()
    relay.client_data(b"all of it")
    relay.client_eof_received()
    _, up = book.connect()
    assert up.ops == [("write", b"all of it"), ("eof", None)]


def test_a_reset_on_one_side_aborts_the_other() -> None:
    book = Book([A])
    relay, client = book.accept()
    _, up = book.connect()
    relay.backend_lost(error=True)
    assert client.names() == ["abort"] and up.names() == ["close"]
    assert book.log[0]["outcome"] == "backend reset"
    relay2, _client2 = book.accept()
    _, up2 = book.connect()
    relay2.client_lost(error=True)
    assert up2.names() == ["abort"]


def test_refused_connect_is_retried_on_another_backend() -> None:
    book = Book([A, B])
    relay, client = book.accept()
    relay.client_data(b"hello")
    first = book.refuse()
    assert first.errors_connect == 1 and first.in_flight == 0 and first.retries == 1
    assert book.connects[0][3] == 0.0  # another backend: at once
    second, up = book.connect()
    assert second.id != first.id and up.written() == b"hello"
    assert book.log == [] and not client.closed
    relay.client_lost(error=False)
    assert book.log[0]["attempts"] == 2


def test_the_only_backend_is_tried_again_within_attempts_then_the_client_is_closed() -> None:
    book = Book([A])
    _relay, client = book.accept()
    delays = []
    for _ in range(book.cfg.retries.attempts):
        assert book.connects[0][1].id == "a"
        delays.append(book.connects[0][3])
        book.refuse("timeout")
    interval = book.cfg.retries.interval
    assert delays == [0.0] + [interval] * (book.cfg.retries.attempts - 1)
    assert book.connects == [] and client.names() == ["close"]
    assert book.log[0]["outcome"] == "backend timeout failed"
    assert book.cluster.backends["a"].in_flight == 0


def test_no_backend_closes_the_client() -> None:
    book = Book([A])
    book.cluster.backends["a"].admin_state = "maint"
    book.cluster.invalidate()
    _, client = book.accept()
    assert client.names() == ["close"] and book.ctx.stats.refused == 1


def test_idle_connections_are_closed_and_traffic_keeps_them_open() -> None:
    book = Book([A], timeouts=replace(Config().timeouts, tcp_idle=10.0))
    relay, client = book.accept()
    _, up = book.connect()
    for _ in range(5):  # 40 s, with a byte every 8 s
        book.sweep(8.0)
        relay.client_data(b".")
    book.sweep(8.0)
    book.sweep(8.0)
    assert not client.closed
    book.sweep(8.0)
    assert client.closed and up.closed and book.log[0]["outcome"] == "idle timeout"


def test_backpressure_both_ways() -> None:
    book = Book([A])
    relay, client = book.accept()
    relay.client_data(b"x" * (HOLD_HIGH + 1))  # connecting: too much held, stop reading
    assert client.names() == ["pause"]
    _, up = book.connect()
    assert client.names() == ["pause", "resume"]
    relay.client_pause_writing()  # the client reads slowly: stop reading the backend
    relay.client_pause_writing()
    assert up.names() == ["write", "pause"]
    relay.client_resume_writing()
    assert up.names() == ["write", "pause", "resume"]
    relay.backend_pause_writing()  # the backend reads slowly: stop reading the client
    relay.backend_resume_writing()
    assert client.names()[-2:] == ["pause", "resume"]


def test_least_connections_counts_open_connections() -> None:
    book = Book([A, B], algorithm="least-connections")
    picked = []
    for _ in range(4):
        book.accept()
        picked.append(book.connect()[0].id)
    assert sorted(picked) == ["a", "a", "b", "b"]


def test_source_hash_keys_on_the_client_address() -> None:
    book = Book([A, B], algorithm="source-hash")
    chosen = set()
    for port in range(10):
        book.accept(("203.0.113.9", 1000 + port))
        chosen.add(book.connect()[0].id)
    assert len(chosen) == 1


# ---------------------------------------------------------------- SNI routing

WWW = BackendSpec("10.0.0.1", 443, name="www", sni=("www.example.test",))
WILD = BackendSpec("10.0.0.2", 443, name="wild", sni=("*.example.test",))
DEFAULT = BackendSpec("10.0.0.3", 443, name="default")


def test_sni_routes_exact_then_wildcard_then_default() -> None:
    book = Book([WWW, WILD, DEFAULT])
    for name, want in (
        ("www.example.test", "www"),
        ("api.example.test", "wild"),
        ("other.test", "default"),
        (None, "default"),
    ):
        relay, _ = book.accept()
        hello = client_hello(name)
        relay.client_data(hello[:10])  # the hello in two segments
        assert book.connects == []
        relay.client_data(hello[10:])
        backend, up = book.connect()
        assert backend.id == want and up.written() == hello  # passed on untouched
        assert relay.sni == name


def test_no_match_and_no_default_is_an_unrecognized_name_alert() -> None:
    book = Book([WWW])
    relay, client = book.accept()
    relay.client_data(client_hello("nope.test"))
    assert client.ops == [("write", UNRECOGNIZED_NAME_ALERT), ("close", None)]
    assert book.connects == [] and book.log[0]["sni"] == "nope.test"


def test_hostile_and_slow_hellos_are_refused() -> None:
    book = Book([WWW, DEFAULT])
    relay, client = book.accept()
    relay.client_data(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00")
    assert client.names() == ["close"] and "ClientHello" in book.log[-1]["outcome"]
    relay, client = book.accept()
    relay.client_data(client_hello("www.example.test")[:50])
    book.sweep(book.cfg.timeouts.client_hello + 0.5)
    assert client.names() == ["close"] and book.log[-1]["outcome"] == "preface timeout"
    assert book.connects == []


def test_plain_tcp_goes_to_the_default_backends() -> None:
    book = Book([WWW, DEFAULT])
    relay, _ = book.accept()
    relay.client_data(b"GET / HTTP/1.1\r\n\r\n")
    assert book.connect()[0].id == "default"


def test_source_hash_on_the_sni() -> None:
    a = replace(WILD, name="w1", host="10.0.0.5")
    b = replace(WILD, name="w2", host="10.0.0.6")
    book = Book([a, b], algorithm="source-hash", hash_key="sni")
    seen = set()
    for port in range(8):
        relay, _ = book.accept((f"203.0.113.{port}", 999))
        relay.client_data(client_hello("same.example.test"))
        seen.add(book.connect()[0].id)
    assert len(seen) == 1


# ---------------------------------------------------------------- PROXY protocol

TRUSTING = ListenerSettings(mode="tcp", accept_proxy=("198.51.100.0/24",))


def test_a_trusted_source_sends_the_real_client_address() -> None:
    book = Book([A], listener=TRUSTING, algorithm="source-hash")
    relay, _ = book.accept()
    relay.client_data(encode("v2", ("192.0.2.55", 12345), LOCAL)[:9])
    assert book.connects == []
    relay.client_data(encode("v2", ("192.0.2.55", 12345), LOCAL)[9:] + b"payload")
    _, up = book.connect()
    assert up.written() == b"payload" and relay.client_addr == ("192.0.2.55", 12345)
    relay.client_lost(error=False)
    assert book.log[0]["client"] == "192.0.2.55"


def test_malformed_or_missing_header_from_a_trusted_source_closes() -> None:
    book = Book([A], listener=TRUSTING)
    for data in (b"PROXY TCP4 nonsense\r\n", b"GET / HTTP/1.1\r\n"):
        relay, client = book.accept()
        relay.client_data(data)
        assert client.names() == ["close"] and book.connects == []


def test_a_header_from_an_untrusted_source_closes_and_others_are_served() -> None:
    book = Book([A], listener=TRUSTING)
    relay, client = book.accept(("203.0.113.1", 5))
    relay.client_data(encode("v1", ("192.0.2.55", 1), LOCAL))
    assert client.names() == ["close"] and "not in accept_proxy" in book.log[0]["outcome"]
    relay, client = book.accept(("203.0.113.1", 6))
    relay.client_data(b"GET")
    _, up = book.connect()
    assert up.written() == b"GET" and relay.client_addr == ("203.0.113.1", 6)


def test_proxy_header_sent_to_backends() -> None:
    v1 = replace(A, proxy_protocol="v1")
    book = Book([v1])
    relay, _ = book.accept()
    relay.client_data(b"data")
    _, up = book.connect()
    assert up.written() == b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 8443\r\ndata"
    assert relay.bytes_in == 4  # the header is ours, not the client's
    book2 = Book([A], proxy_protocol="v2")
    book2.accept()
    _, up2 = book2.connect()
    assert up2.written() == encode("v2", CLIENT, LOCAL)


def test_overload_and_draining_refuse_at_once() -> None:
    book = Book([A])
    book.ctx.draining = True
    _, client = book.accept()
    assert client.names() == ["close"] and book.connects == []


# ---------------------------------------------------------------- hostile prefaces, fuzzed

PREFIXES = [
    b"",
    encode("v1", ("192.0.2.1", 1), LOCAL),
    encode("v2", ("192.0.2.1", 1), LOCAL),
    client_hello("www.example.test")[:40],
]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(PREFIXES),
    st.lists(st.binary(max_size=300), max_size=6),
    st.booleans(),
    st.booleans(),
)
def test_any_preface_ends_in_a_connect_or_a_close(
    prefix: bytes, chunks: list[bytes], trusted: bool, eof: bool
) -> None:
    listener = TRUSTING if trusted else ListenerSettings(mode="tcp")
    book = Book([WWW, DEFAULT], listener=listener)
    relay, client = book.accept()
    for chunk in [prefix, *chunks]:
        relay.client_data(chunk)
    if eof:
        relay.client_eof_received()
    book.sweep(book.cfg.timeouts.client_hello + 1)  # the preface deadline has passed
    decided = bool(book.connects) or client.closed
    assert decided and relay.state in ("connecting", "closed")
    if relay.state == "closed":  # refused before any backend: nothing was relayed
        assert book.log[-1]["backend"] is None and relay.bytes_in == 0


def test_a_backend_lost_before_it_answered_a_tls_client_is_tried_again() -> None:
    """A balancer killed mid-handshake behind the entry: the TLS client's bytes go to the
    VIP's new owner; nothing was answered, so nothing can have been done twice."""
    book = Book([A])
    relay, client = book.accept()
    hello = client_hello("svc.example")
    relay.client_data(hello[:10])  # held while connecting
    first, up = book.connect()
    assert up.written() == hello[:10]
    relay.client_data(hello[10:])
    relay.backend_lost(error=True)  # RST from the VIP's new owner: no byte came back
    assert not client.closed and book.log == []
    assert book.connects[0][3] == book.cfg.retries.interval  # the same VIP: after a pause
    second, up2 = book.connect()
    assert up2.written() == hello  # the whole hello again, in order
    relay.backend_data(b"\x16\x03\x03 server hello")
    assert client.written() == b"\x16\x03\x03 server hello"
    relay.client_lost(error=False)
    [line] = book.log
    assert line["attempts"] == 2 and line["bytes_in"] == len(hello)
    assert first is second and first.in_flight == 0 and first.retries == 1


def test_no_replay_once_the_backend_answered_or_for_plain_tcp() -> None:
    book = Book([A])
    relay, client = book.accept()
    relay.client_data(client_hello("svc.example"))
    book.connect()
    relay.backend_data(b"\x16 server hello")  # it answered: a retry could repeat its work
    relay.backend_lost(error=True)
    assert client.names()[-1] == "abort" and book.connects == []
    relay2, client2 = book.accept()
    relay2.client_data(b"POST /pay HTTP/1.1\r\n\r\n")  # plain: the server may have acted
    book.connect()
    relay2.backend_lost(error=True)
    assert client2.names()[-1] == "abort" and book.connects == []
