"""Hostile input through a real balancer to a raw recording backend.

For every probe the client sends raw bytes and we check the two safe outcomes only:
either the request was normalised (the backend parsed exactly the requests the client
framed, each well framed) or it was refused with 400/414/431 and the client connection
closed. In no case may the backend see a different number of requests than the client framed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

H = b"Host: a.example\r\n"


@dataclass(frozen=True)
class Probe:
    name: str
    raw: bytes
    refuse: frozenset[int] = frozenset()  # empty: must be normalised and answered 200
    body: bytes | None = None  # for normalised probes: the exact body the backend must get
    target: bytes | None = None
    host: bytes | None = None


def refuse(name: str, raw: bytes, *statuses: int) -> Probe:
    return Probe(name, raw, refuse=frozenset(statuses or (400,)))


def accept(name: str, raw: bytes, body: bytes = b"", **kw: bytes) -> Probe:
    return Probe(name, raw, body=body, **kw)


def post(headers: bytes, body: bytes, version: bytes = b"1.1") -> bytes:
    return b"POST /p HTTP/" + version + b"\r\n" + H + headers + b"\r\n" + body


CHUNKED = b"Transfer-Encoding: chunked\r\n"
SMUGGLE = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"  # 35 bytes

PROBES = [
    # -- CL/TE desync
    refuse(
        "cl.te",
        post(
            b"Content-Length: 6\r\n" + CHUNKED, b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n" + H + b"\r\n"
        ),
    ),
    refuse("te.cl", post(CHUNKED + b"Content-Length: 3\r\n", b"8\r\nSMUGGLED\r\n0\r\n\r\n")),
    # -- Transfer-Encoding obfuscation
    refuse("te xchunked", post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n")),
    refuse("te chunked-identity", post(b"Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n")),
    refuse("te identity-chunked", post(b"Transfer-Encoding: identity, chunked\r\n", b"0\r\n\r\n")),
    refuse("te repeated", post(CHUNKED + CHUNKED, b"0\r\n\r\n")),
    refuse("te space before colon", post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n")),
    refuse("te leading space line", post(b" Transfer-Encoding: chunked\r\n", b"0\r\n\r\n")),
    refuse("te vertical tab", post(b"Transfer-Encoding:\x0bchunked\r\n", b"0\r\n\r\n")),
    refuse("te quoted", post(b'Transfer-Encoding: "chunked"\r\n', b"0\r\n\r\n")),
    refuse("te chunked-chunked", post(b"Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n")),
    refuse("te in http/1.0", post(CHUNKED, b"5\r\nhello\r\n0\r\n\r\n", version=b"1.0")),
    accept(
        "te leading space value",
        post(b"Transfer-Encoding:   chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
        b"hello",
    ),
    accept(
        "te tab", post(b"Transfer-Encoding:\tchunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"), b"hello"
    ),
    accept(
        "te Chunked", post(b"Transfer-Encoding: Chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"), b"hello"
    ),
    accept(
        "te CHUNKED", post(b"transfer-encoding: CHUNKED\r\n", b"5\r\nhello\r\n0\r\n\r\n"), b"hello"
    ),
    # -- Content-Length games
    refuse("cl plus sign", post(b"Content-Length: +5\r\n", b"hello")),
    refuse("cl minus sign", post(b"Content-Length: -5\r\n", b"hello")),
    refuse("cl inner space", post(b"Content-Length: 1 0\r\n", b"0123456789")),
    refuse("cl list", post(b"Content-Length: 1, 1\r\n", b"x")),
    refuse("cl hex", post(b"Content-Length: 0x5\r\n", b"hello")),
    refuse("cl empty", post(b"Content-Length: \r\n", b"")),
    refuse("cl huge", post(b"Content-Length: 99999999999999999999999\r\n", b"x")),
    refuse(
        "cl differing duplicates", post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!")
    ),
    refuse("cl equal duplicates", post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello")),
    accept("cl leading zeros", post(b"Content-Length: 005\r\n", b"hello"), b"hello"),
    accept("cl body holds a request", post(b"Content-Length: 35\r\n", SMUGGLE), SMUGGLE),
    # -- line syntax
    refuse("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n"),
    refuse("obs-fold tab", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n\tb\r\n\r\n"),
    refuse("bare lf", b"GET / HTTP/1.1\nHost: a\n\n"),
    refuse("bare lf in headers", b"GET / HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n"),
    refuse("bare cr in value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n"),
    refuse("bare cr line end", b"GET / HTTP/1.1\r" + H + b"\r\n"),
    refuse("nul in name", b"GET / HTTP/1.1\r\n" + H + b"X-\x00A: b\r\n\r\n"),
    refuse("nul in value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n"),
    refuse("ctl in value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x01b\r\n\r\n"),
    refuse("del in value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x7fb\r\n\r\n"),
    refuse("space in name", b"GET / HTTP/1.1\r\n" + H + b"X A: b\r\n\r\n"),
    refuse("empty name", b"GET / HTTP/1.1\r\n" + H + b": b\r\n\r\n"),
    refuse("missing colon", b"GET / HTTP/1.1\r\n" + H + b"X-A b\r\n\r\n"),
    refuse("space in target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n"),
    refuse("tab in target", b"GET /a\tb HTTP/1.1\r\n" + H + b"\r\n"),
    refuse("bad version", b"GET / HTTP/1.x\r\n" + H + b"\r\n"),
    refuse("http/2.0 version", b"GET / HTTP/2.0\r\n" + H + b"\r\n"),
    refuse("http/0.9", b"GET /\r\n\r\n"),
    refuse("garbage", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40),
    refuse("lowercase method", b"get / HTTP/1.1\r\n" + H + b"\r\n"),
    refuse("missing host", b"GET / HTTP/1.1\r\n\r\n"),
    refuse("two hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    accept("obs-text value", b"GET /t HTTP/1.1\r\n" + H + b"X-A: caf\xe9\r\n\r\n"),
    accept("http/1.0 without host", b"GET /t HTTP/1.0\r\n\r\n", target=b"/t"),
    # -- chunked body syntax
    refuse("chunk size not hex", post(CHUNKED, b"zz\r\nhello\r\n0\r\n\r\n")),
    refuse("chunk size negative", post(CHUNKED, b"-5\r\nhello\r\n0\r\n\r\n")),
    refuse("chunk size 0x", post(CHUNKED, b"0x5\r\nhello\r\n0\r\n\r\n")),
    refuse("chunk size overflow", post(CHUNKED, b"1" + b"0" * 20 + b"\r\nhello\r\n0\r\n\r\n")),
    refuse("chunk size trailing space", post(CHUNKED, b"5 \r\nhello\r\n0\r\n\r\n")),
    refuse("chunk size leading space", post(CHUNKED, b" 5\r\nhello\r\n0\r\n\r\n")),
    refuse("chunk data too long", post(CHUNKED, b"3\r\nhello\r\n0\r\n\r\n")),
    refuse("chunk missing crlf", post(CHUNKED, b"5\r\nhello0\r\n\r\n")),
    refuse("chunk bare lf", post(CHUNKED, b"5\nhello\n0\n\n")),
    refuse("chunk ext ctl", post(CHUNKED, b"5;a=\x01\r\nhello\r\n0\r\n\r\n")),
    accept("chunk ext", post(CHUNKED, b"5;foo=bar\r\nhello\r\n0\r\n\r\n"), b"hello"),
    accept("chunk ext quoted", post(CHUNKED, b'5;foo="b r"\r\nhello\r\n0\r\n\r\n'), b"hello"),
    accept("chunk upper hex", post(CHUNKED, b"A\r\n0123456789\r\n0\r\n\r\n"), b"0123456789"),
    accept("chunk trailer", post(CHUNKED, b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"), b"hello"),
    accept("chunk zero-padded size", post(CHUNKED, b"0005\r\nhello\r\n000\r\n\r\n"), b"hello"),
    # -- request targets
    accept(
        "absolute-form",
        b"GET http://b.example:81/p?q=1 HTTP/1.1\r\nHost: other\r\n\r\n",
        target=b"/p?q=1",
        host=b"b.example:81",
    ),
    accept("absolute-form no path", b"GET http://b.example HTTP/1.1\r\n\r\n", target=b"/"),
    accept("asterisk-form", b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", target=b"*"),
    refuse("asterisk-form on GET", b"GET * HTTP/1.1\r\n" + H + b"\r\n"),
    refuse("absolute-form userinfo", b"GET http://u@b.example/ HTTP/1.1\r\n" + H + b"\r\n"),
    refuse("absolute-form bad scheme", b"GET ftp://b.example/ HTTP/1.1\r\n" + H + b"\r\n"),
    refuse("authority-form", b"CONNECT b.example:443 HTTP/1.1\r\n" + H + b"\r\n"),
    # -- sizes (the test balancer uses small limits, see `bal` below)
    refuse("long request line", b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    refuse("long header", b"GET / HTTP/1.1\r\n" + H + b"X-A: " + b"v" * 5000 + b"\r\n\r\n", 431),
    refuse(
        "many headers",
        b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(60)) + b"\r\n",
        431,
    ),
    refuse(
        "upgrade with body",
        post(b"Connection: Upgrade\r\nUpgrade: x\r\nContent-Length: 1\r\n", b"x"),
    ),
]


@pytest.fixture
async def bal(start_balancer, raw_backend):  # type: ignore[no-untyped-def]
    backend = await raw_backend()
    balancer = await start_balancer(
        [backend],
        limits={"max_request_line": 2048, "max_header_bytes": 4096, "max_headers": 50},
        retries={"attempts": 1},
    )
    return balancer, backend


@pytest.mark.parametrize("probe", PROBES, ids=[p.name for p in PROBES])
async def test_probe(bal, raw_client, parse, error_logs, probe: Probe) -> None:  # type: ignore[no-untyped-def]
    balancer, backend = bal
    client = raw_client(balancer)
    if probe.refuse:
        data, closed = await client.exchange(probe.raw)
        resps = parse(data)
        assert resps, f"no response to {probe.raw!r}: {data!r}"
        assert resps[0].status in probe.refuse, data
        assert resps[0].complete and resps[0].body.startswith(b"%d " % resps[0].status)
        assert resps[0].header(b"connection") == b"close"
        assert len(resps) == 1, data
        assert closed, "the connection must be closed after a refusal"
        # nothing complete reached the backend; any half-sent request was cut off
        assert not [r for r in backend.requests if r.complete]
        assert await backend.wait_for(lambda: all(c.closed for c in backend.conns))
    else:
        data, resps = await client.request(probe.raw)
        assert len(resps) == 1 and resps[0].status == 200 and resps[0].body == b"ok", data
        assert len(backend.requests) == 1
        conn = backend.conns[0]
        assert conn.parse_error is None
        req = conn.requests[0]
        assert req.complete
        # exactly one request in the bytes the backend got: nothing left over to misparse
        assert conn.begun == 1
        assert req.body == (probe.body or b"")
        assert req.version == "1.1"
        if probe.target is not None:
            assert req.target == probe.target
        if probe.host is not None:
            assert req.header(b"host") == [probe.host]
        assert len(req.header(b"host")) <= 1
        assert len(req.header(b"transfer-encoding")) + len(req.header(b"content-length")) <= 1
    # the balancer keeps serving others
    _, ok = await client.request(b"GET /after HTTP/1.1\r\n" + H + b"\r\n")
    assert ok and ok[0].status == 200
    assert not error_logs.records, [r.getMessage() for r in error_logs.records]


def echo_target(req, conn):  # type: ignore[no-untyped-def]
    body = req.target + b" " + req.body
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


async def test_pipelined_requests_reach_backend_exactly(start_balancer, raw_backend, raw_client):  # type: ignore[no-untyped-def]
    backend = await raw_backend(echo_target)
    balancer = await start_balancer([backend])
    raw = (
        b"GET /one HTTP/1.1\r\n" + H + b"\r\n"
        b"POST /two HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello"
        b"POST /three HTTP/1.1\r\n" + H + CHUNKED + b"\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    data, resps = await raw_client(balancer).request(raw, count=3)
    assert [r.body for r in resps] == [b"/one ", b"/two hello", b"/three abc"], data
    assert [r.target for r in backend.requests] == [b"/one", b"/two", b"/three"]
    # kept alive on both sides: one backend connection carried all three
    assert len(backend.conns) == 1 and backend.conns[0].begun == 3


async def test_pipelined_then_malformed(start_balancer, raw_backend, raw_client, parse):  # type: ignore[no-untyped-def]
    backend = await raw_backend(echo_target)
    balancer = await start_balancer([backend])
    raw = (
        b"GET /one HTTP/1.1\r\n" + H + b"\r\n"
        b"GET /two HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n"
        b"GET /three HTTP/1.1\r\n" + H + b"\r\n"
    )
    data, closed = await raw_client(balancer).exchange(raw)
    resps = parse(data)
    assert [r.status for r in resps] == [200, 400], data
    assert resps[0].body == b"/one "
    assert closed
    assert [r.target for r in backend.requests] == [b"/one"]


@pytest.mark.parametrize(
    "raw",
    [
        post(b"Content-Length: 6\r\n" + CHUNKED, b"0\r\n\r\nX"),
        post(CHUNKED, b"5\r\nhello\r\nzz\r\n"),
        b"GET / HTTP/1.1\r\n" + H + b"X-A: " + b"v" * 5000 + b"\r\n\r\n",
    ],
    ids=["cl.te", "bad second chunk", "long header"],
)
async def test_byte_at_a_time(bal, raw_client, parse, raw: bytes) -> None:  # type: ignore[no-untyped-def]
    """The same verdicts when every byte arrives in its own packet."""
    balancer, backend = bal
    reader, writer = await raw_client(balancer).open()
    for i in range(len(raw)):
        if writer.is_closing():
            break
        try:
            writer.write(raw[i : i + 1])
            await writer.drain()
        except ConnectionError:
            break
        if i % 64 == 0:
            await asyncio.sleep(0)
    data = await asyncio.wait_for(reader.read(), 10)
    resps = parse(data)
    assert len(resps) == 1 and resps[0].status in (400, 431)
    assert not [r for r in backend.requests if r.complete]


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno",
        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno",
        b"HTTP/1.1 426 Upgrade Required\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nno\r\n0\r\n\r\n",
    ],
    ids=["200", "400", "426 chunked"],
)
async def test_upgrade_refused_by_backend(
    start_balancer, raw_backend, raw_client, parse, reply: bytes
) -> None:  # type: ignore[no-untyped-def]
    backend = await raw_backend(lambda req, conn: reply)
    balancer = await start_balancer([backend])
    raw = (
        b"GET /ws HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        b"early tunnel bytes"
    )
    data, closed = await raw_client(balancer).exchange(raw)
    resps = parse(data)
    assert len(resps) == 1 and resps[0].complete and resps[0].body == b"no", data
    assert closed, "after a refused upgrade the client connection is closed"
    assert len(backend.requests) == 1
    req = backend.requests[0]
    assert req.header(b"upgrade") == [b"websocket"]
    # the bytes after the head were never sent as if they were a request
    assert backend.conns[0].begun == 1


async def test_expect_continue(start_balancer, raw_backend, raw_client, read_helpers):  # type: ignore[no-untyped-def]
    def responder(req, conn):  # type: ignore[no-untyped-def]
        return echo_target(req, conn)

    backend = await raw_backend(responder)
    balancer = await start_balancer([backend])
    reader, writer = await raw_client(balancer).open()
    writer.write(
        b"POST /up HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    await writer.drain()
    await backend.wait_for(lambda: backend.conns and backend.conns[0].begun == 1)
    writer.write(b"hello")
    _, resps = await read_helpers.responses(reader, 1)
    assert resps[-1].status == 200 and resps[-1].body == b"/up hello"
    assert backend.requests[0].header(b"expect") == [b"100-continue"]


async def test_interim_100_is_relayed(start_balancer, raw_backend, raw_client, read_helpers):  # type: ignore[no-untyped-def]
    def responder(req, conn):  # type: ignore[no-untyped-def]
        return b"HTTP/1.1 100 Continue\r\n\r\n" + echo_target(req, conn)

    backend = await raw_backend(responder)
    balancer = await start_balancer([backend])
    reader, writer = await raw_client(balancer).open()
    writer.write(
        b"POST /up HTTP/1.1\r\n" + H + b"Content-Length: 2\r\nExpect: 100-continue\r\n\r\nhi"
    )
    data, resps = await read_helpers.responses(reader, 2)
    assert [r.status for r in resps] == [100, 200]
    assert resps[1].body == b"/up hi"
    assert data.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")


BAD_REPLIES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    b"NOT HTTP AT ALL\r\n\r\n",
]


@pytest.mark.parametrize("reply", BAD_REPLIES, ids=range(len(BAD_REPLIES)))
async def test_malformed_backend_response_is_502(
    start_balancer, raw_backend, raw_client, error_logs, reply: bytes
) -> None:  # type: ignore[no-untyped-def]
    backend = await raw_backend(lambda req, conn: reply)
    balancer = await start_balancer([backend], outlier={"consecutive_failures": 1000})
    data, resps = await raw_client(balancer).request(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    assert len(resps) == 1 and resps[0].status == 502, data
    assert resps[0].body.startswith(b"502 ")
    assert not error_logs.records


async def test_backend_trailers_are_dropped(start_balancer, raw_backend, raw_client):  # type: ignore[no-untyped-def]
    reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: 1\r\n\r\n"
    backend = await raw_backend(lambda req, conn: reply)
    balancer = await start_balancer([backend])
    data, resps = await raw_client(balancer).request(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    assert resps[0].body == b"ok" and data.endswith(b"\r\n2\r\nok\r\n0\r\n\r\n")
