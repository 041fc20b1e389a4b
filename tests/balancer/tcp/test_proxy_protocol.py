"""The PROXY protocol codec: round trips (v1, v2; IPv4, IPv6), every prefix, refusals and
hostile bytes (Hypothesis)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.tcp.proxy import encode, looks_like_header, parse, trusted

ports = st.integers(0, 65535)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["v1", "v2"]), st.one_of(st.tuples(v4, v4), st.tuples(v6, v6)), ports, ports)
def test_round_trip(version: str, addrs: tuple[str, str], sport: int, dport: int) -> None:
    header = encode(version, (addrs[0], sport), (addrs[1], dport))
    result = parse(header + b"GET / HTTP/1.1\r\n")
    assert result.status == "ok" and result.consumed == len(header)
    assert result.source == (str(ipaddress.ip_address(addrs[0])), sport)
    assert result.dest == (str(ipaddress.ip_address(addrs[1])), dport)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_every_prefix_asks_for_more(version: str) -> None:
    header = encode(version, ("192.0.2.7", 51000), ("10.0.0.1", 443))
    for n in range(1, len(header)):
        assert parse(header[:n]).status == "more", n
        assert looks_like_header(header[:n]) in (True, None)


def test_known_encodings() -> None:
    assert encode("v1", ("192.0.2.7", 51000), ("10.0.0.1", 443)) == (
        b"PROXY TCP4 192.0.2.7 10.0.0.1 51000 443\r\n"
    )
    v2 = encode("v2", ("192.0.2.7", 51000), ("10.0.0.1", 443))
    assert v2[:12] == b"\r\n\r\n\x00\r\nQUIT\n" and v2[12:16] == b"\x21\x11\x00\x0c"
    # a v4 client on a v6 listener: both sides mapped
    assert parse(encode("v1", ("192.0.2.7", 1), ("::1", 2))).source == ("::ffff:c000:207", 1)


def test_local_and_unknown_keep_the_socket_address() -> None:
    local = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"
    assert parse(local).status == "ok" and parse(local).source is None
    assert parse(b"PROXY UNKNOWN\r\n").source is None


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
        b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n",
        b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
        b"PROXY TCP4 x 5.6.7.8 1 2\r\n",
        b"PROXY " + b"A" * 120,
        b"\r\n\r\n\x00\r\nQUIT\n\x22\x11\x00\x0c" + bytes(12),
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x04" + bytes(4),
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x31\x00\x0c" + bytes(12),
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff",
        b"\r\nX",
    ],
)
def test_malformed_headers_are_invalid(data: bytes) -> None:
    assert parse(data).status == "invalid"


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_hostile_bytes_never_raise(data: bytes) -> None:
    for prefix in (b"", b"PROXY ", b"\r\n\r\n\x00\r\nQUIT\n"):
        result = parse(prefix + data)
        assert result.status in ("more", "ok", "invalid")
        if result.status == "ok":
            assert 0 < result.consumed <= len(prefix + data)


def test_looks_like_header() -> None:
    assert looks_like_header(b"PROXY TCP4") is True
    assert looks_like_header(b"PRO") is None and looks_like_header(b"") is None
    assert looks_like_header(b"GET /") is False and looks_like_header(b"\x16\x03") is False


def test_trusted_sources() -> None:
    nets = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert trusted("10.1.2.3", nets) and trusted("::ffff:10.0.0.1", nets) and trusted("::1", nets)
    assert not trusted("192.0.2.1", nets) and not trusted("unknown", nets)
