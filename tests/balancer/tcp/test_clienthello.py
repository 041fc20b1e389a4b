"""The ClientHello reader: real hellos from Python's TLS client, split every way, and
hostile bytes (Hypothesis) that must never raise."""

from __future__ import annotations

from hellos import client_hello, rerecord
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.tcp.clienthello import (
    MAX_HELLO,
    UNRECOGNIZED_NAME_ALERT,
    read_client_hello,
    sni_matches,
)

STATUSES = {"more", "hello", "not-tls", "invalid"}


HELLO = client_hello("api.example.test")


def test_reads_the_server_name_of_a_real_hello() -> None:
    result = read_client_hello(HELLO)
    assert (result.status, result.sni) == ("hello", "api.example.test")


def test_upper_case_name_is_lowered() -> None:
    assert read_client_hello(client_hello("WWW.Example.TEST")).sni == "www.example.test"


def test_hello_without_a_server_name() -> None:
    result = read_client_hello(client_hello(None))
    assert (result.status, result.sni) == ("hello", None)


def test_every_prefix_asks_for_more() -> None:
    # the hello arriving one TCP segment at a time: nothing is decided early
    for n in range(1, len(HELLO)):
        assert read_client_hello(HELLO[:n]).status == "more", n
    assert read_client_hello(HELLO).sni == "api.example.test"


def test_hello_split_over_several_records() -> None:
    for size in (1, 7, 100, 511):
        split = rerecord(HELLO, size)
        assert read_client_hello(split).sni == "api.example.test", size
        assert read_client_hello(split[:-1]).status == "more"


def test_bytes_after_the_hello_are_ignored() -> None:
    assert read_client_hello(HELLO + b"\x17\x03\x03\x00\x05hello").sni == "api.example.test"


def test_plain_protocols_are_not_tls() -> None:
    for first in (b"GET / HTTP/1.1\r\n", b"SSH-2.0-x\r\n", b"\x16\x02\x00"):
        assert read_client_hello(first).status == "not-tls"


def test_refusals() -> None:
    cases = {
        "a handshake that is not a ClientHello": b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",
        "an alert record in the middle": rerecord(HELLO, 50)[:55] + b"\x15\x03\x03\x00\x02\x02\x28",
        "an empty record": b"\x16\x03\x01\x00\x00",
        "an oversized hello": b"\x16\x03\x01\x00\x04\x01" + (MAX_HELLO + 1).to_bytes(3),
        "a truncated body": b"\x16\x03\x01\x00\x06\x01\x00\x00\x02\x03\x03",
    }
    for what, data in cases.items():
        assert read_client_hello(data).status == "invalid", what


def test_alert_is_a_fatal_unrecognized_name() -> None:
    assert UNRECOGNIZED_NAME_ALERT[0] == 0x15 and UNRECOGNIZED_NAME_ALERT[-2:] == b"\x02\x70"


def test_sni_patterns() -> None:
    assert sni_matches("a.example", "a.example")
    assert not sni_matches("a.example", "b.a.example")
    assert sni_matches("*.example", "a.example") and sni_matches("*.example", "x.y.example")
    assert not sni_matches("*.example", "example") and not sni_matches("*.example", "aexample")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data: bytes) -> None:
    assert read_client_hello(data).status in STATUSES
    assert read_client_hello(b"\x16\x03\x01" + data).status in STATUSES


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(HELLO) - 1), st.integers(0, 255)), max_size=8))
def test_mutated_hellos_never_raise(flips: list[tuple[int, int]]) -> None:
    data = bytearray(HELLO)
    for pos, value in flips:
        data[pos] = value
    result = read_client_hello(bytes(data))
    assert result.status in STATUSES
    if result.status == "hello" and result.sni is not None:
        assert result.sni.isascii() and result.sni == result.sni.lower()


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(0, 2000))
def test_any_record_split_and_cut_point(size: int, cut: int) -> None:
    split = rerecord(HELLO, size)
    cut = min(cut, len(split))
    result = read_client_hello(split[:cut])
    assert result.status == ("hello" if cut == len(split) else "more")
