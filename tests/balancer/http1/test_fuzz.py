"""Property tests: head round-trips in the pure core, chunked framing and garbage through a
real loopback balancer."""

from __future__ import annotations

import asyncio
import itertools

import httptools
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer.http1.head import (
    HOP_BY_HOP,
    ForwardOptions,
    Framing,
    backend_request,
    inspect_request,
)

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
REWRITTEN = {
    b"host",
    b"content-length",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"forwarded",
    b"via",
    b"x-request-id",
}
SPECIAL = HOP_BY_HOP | REWRITTEN

names = (
    st.text(TCHAR, min_size=1, max_size=20)
    .map(str.encode)
    .filter(lambda n: n.lower() not in SPECIAL)
)
# visible ASCII and obs-text, inner spaces/tabs allowed, no leading/trailing whitespace
values = st.binary(max_size=40).map(
    lambda b: bytes(c for c in b if c in (0x20, 0x09) or 0x21 <= c <= 0x7E or c >= 0x80).strip(
        b" \t"
    )
)
headers_st = st.lists(st.tuples(names, values), max_size=15)
targets = st.text("abcdefghijklmnopqrstuvwxyz0123456789-._~%/?=&", max_size=30).map(
    lambda t: b"/" + t.encode()
)
methods = st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"])
hop = st.sampled_from(
    [
        (b"Connection", b"keep-alive"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Proxy-Connection", b"close"),
        (b"Trailer", b"X-T"),
        (b"Proxy-Authorization", b"Basic eA=="),
    ]
)


class _Collect:
    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.done = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done += 1


def llhttp_parse(raw: bytes) -> tuple[httptools.HttpRequestParser, _Collect]:
    sink = _Collect()
    parser = httptools.HttpRequestParser(sink)
    parser.feed_data(raw)
    return parser, sink


@settings(max_examples=200, deadline=None)
@given(
    method=methods,
    target=targets,
    headers=headers_st,
    hops=st.lists(st.tuples(st.integers(0, 15), hop), max_size=4),
    xff=st.sampled_from([b"", b"10.0.0.1", b"10.0.0.1, 10.0.0.2"]),
)
def test_well_formed_heads_round_trip(method, target, headers, hops, xff) -> None:  # type: ignore[no-untyped-def]
    sent = [(b"Host", b"h.example"), *headers]
    for pos, h in hops:
        sent.insert(min(pos, len(sent)), h)
    if xff:
        sent.append((b"X-Forwarded-For", xff))
    raw = method + b" " + target + b" HTTP/1.1\r\n"
    raw += b"".join(n + b": " + v + b"\r\n" for n, v in sent) + b"\r\n"
    parser, got = llhttp_parse(raw)  # what the proxy's parser delivers
    req = inspect_request(parser.get_method(), got.url, parser.get_http_version(), got.headers)
    assert req.framing is Framing.NONE and req.target == target
    out = backend_request(req, b"127.0.0.1", ForwardOptions())
    parser2, back = llhttp_parse(out)  # and the backend's view of what we forward
    assert back.done == 1 and back.url == target and parser2.get_method() == method
    assert parser2.get_http_version() == "1.1"
    plain = [(n, v) for n, v in back.headers if n.lower() not in SPECIAL]
    assert plain == headers  # same names (spelling too), same values, same order
    hdr = {n.lower(): v for n, v in back.headers}
    assert not any(n.lower() in HOP_BY_HOP for n, _ in back.headers)
    assert hdr[b"host"] == b"h.example"
    assert hdr[b"x-forwarded-for"] == (xff + b", 127.0.0.1" if xff else b"127.0.0.1")


# ---------------------------------------------------------------- through a loopback balancer


def chunk_encode(body: bytes, cuts: list[int], ext: bool) -> bytes:
    out = b""
    points = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    for a, b in itertools.pairwise(points):
        if b > a:
            out += b"%x%s\r\n%s\r\n" % (b - a, b";x=1" if ext else b"", body[a:b])
    return out + b"0\r\n\r\n"


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


async def _send_pieces(addr, pieces: list[bytes]) -> bytes:  # type: ignore[no-untyped-def]
    reader, writer = await asyncio.open_connection(*addr)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:
        return b""
    finally:
        writer.close()


def _echo_body(req, conn):  # type: ignore[no-untyped-def]
    conn.hangup = True
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(req.body), req.body)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    body=st.binary(max_size=3000),
    cuts=st.lists(st.integers(0, 4000), max_size=8),
    splits=st.lists(st.integers(0, 4000), max_size=8),
    ext=st.booleans(),
)
async def test_chunked_bodies_arrive_exactly(
    start_balancer, raw_backend, body, cuts, splits, ext
) -> None:  # type: ignore[no-untyped-def]
    """Any chunking of a body, in any TCP segmentation: the backend gets exactly the bytes."""
    if not hasattr(test_chunked_bodies_arrive_exactly, "env"):
        backend = await raw_backend(_echo_body)
        bal = await start_balancer([backend])
        test_chunked_bodies_arrive_exactly.env = (bal, backend)  # type: ignore[attr-defined]
    bal, backend = test_chunked_bodies_arrive_exactly.env  # type: ignore[attr-defined]
    before = len(backend.requests)
    raw = (
        b"POST /u HTTP/1.1\r\nHost: h\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunk_encode(body, cuts, ext)
    )
    data = await _send_pieces(bal.address, split_at(raw, splits))
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\n" + body)
    assert len(backend.requests) == before + 1 and backend.requests[-1].body == body


# mutations of a valid request: flip, insert or delete bytes, with framing-relevant bytes favoured
BASE = (
    b"POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n"
)
mut_byte = st.one_of(st.sampled_from(b"\r\n \t:;,\x00\x7f0aF-+"), st.integers(0, 255))
mutation = st.tuples(st.sampled_from(["set", "insert", "delete"]), st.integers(0, 200), mut_byte)


def mutate(data: bytes, muts: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, byte in muts:
        i = pos % (len(buf) + 1)
        if kind == "insert":
            buf.insert(i, byte)
        elif i < len(buf):
            if kind == "set":
                buf[i] = byte
            else:
                del buf[i]
    return bytes(buf)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(muts=st.lists(mutation, min_size=1, max_size=4), splits=st.lists(st.integers(0, 300)))
async def test_mutated_requests_never_break_the_balancer(
    start_balancer, raw_backend, error_logs, muts, splits
) -> None:  # type: ignore[no-untyped-def]
    """Garbage gets a well-formed answer (or a valid 200), the connection ends, no traceback,
    and the backend never sees more requests than the client sent request lines."""
    if not hasattr(test_mutated_requests_never_break_the_balancer, "env"):
        backend = await raw_backend(_echo_body)
        bal = await start_balancer(
            [backend], timeouts={"client_header": 0.2, "client_body": 0.2, "idle_keepalive": 0.2}
        )
        test_mutated_requests_never_break_the_balancer.env = (bal, backend)  # type: ignore[attr-defined]
    bal, backend = test_mutated_requests_never_break_the_balancer.env  # type: ignore[attr-defined]
    before = len(backend.requests)
    raw = mutate(BASE, muts)
    data = await _send_pieces(bal.address, [raw])  # bounded: the balancer closes or times out
    if data:
        status = int(data[9:12])
        assert data.startswith(b"HTTP/1.1 ") and status in (200, 400, 408, 413, 414, 431, 502)
        if status != 200:
            assert b"\r\n\r\n%d " % status in data
    got = backend.requests[before:]
    assert len(got) <= max(1, raw.count(b"HTTP/1.1\r\n"))
    assert not error_logs.records, [r.getMessage() for r in error_logs.records]
