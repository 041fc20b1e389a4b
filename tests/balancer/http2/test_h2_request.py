"""The pure translation of heads between HTTP/2 fields and HTTP/1.1: request validation
(with its cache of fields already found valid) and response heads."""

from __future__ import annotations

import pytest

from balancer.http2 import request
from balancer.http2.request import StreamError, request_head, response_headers

BASE = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"x")]


@pytest.mark.parametrize(
    "bad",
    [
        (b"x-a", b"1\n2"),
        (b"x-a", b" lead"),
        (b"X-Upper", b"1"),
        (b"connection", b"close"),
        (b"te", b"gzip"),
    ],
)
def test_a_bad_field_is_refused_every_time_even_after_good_ones_were_cached(
    bad: tuple[bytes, bytes],
) -> None:
    good = [(b"x-a", b"1"), (b"te", b"trailers"), (b"accept", b"*/*")]
    for _ in range(3):  # the second and third time the good fields come from the cache
        req = request_head(BASE + good, True)
        assert b"x-a: 1\r\n" in req.forward and b"te" not in req.forward.lower()
        with pytest.raises(StreamError):
            request_head(BASE + good + [bad], True)


def test_the_cache_is_bounded_in_entries_and_in_field_size() -> None:
    long = (b"x-long", b"v" * (request.CLEAN_FIELD + 1))
    request_head(BASE + [long], True)
    assert long not in request._CLEAN
    for i in range(request.CLEAN_MAX + 10):
        request_head(BASE + [(b"x-n", b"%d" % i)], True)
    assert len(request._CLEAN) <= request.CLEAN_MAX + len(BASE) + 1


def test_a_pseudo_header_cached_as_valid_is_still_checked_for_its_place() -> None:
    request_head(BASE, True)
    with pytest.raises(StreamError):
        request_head([(b"accept", b"*/*"), *BASE], True)  # after a regular field
    with pytest.raises(StreamError):
        request_head([*BASE, (b":method", b"GET")], True)  # repeated


def test_a_response_head_becomes_lowercase_fields_without_hop_by_hop_ones() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nServer: n \t\r\nX-Empty:\r\nX-Sp: \r\nConnection: keep-alive\r\n"
        b"Content-Length: 3\r\nConnection: X-Secret, close\r\nX-Secret: 1\r\nKeep-Alive: 5\r\n"
    )
    fields, length, chunked = response_headers(200, raw, [(b"x-extra", b"e")])
    assert fields == [
        (b":status", b"200"),
        (b"server", b"n"),
        (b"x-empty", b""),
        (b"x-sp", b""),
        (b"content-length", b"3"),
        (b"x-extra", b"e"),
    ]
    assert (length, chunked) == (3, False)


def test_a_chunked_response_and_a_bad_length_are_told_apart() -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: x\r\nA: b\r\n"
    fields, length, chunked = response_headers(200, raw, [])
    assert fields == [(b":status", b"200"), (b"a", b"b")]
    assert (length, chunked) == (-1, True)
