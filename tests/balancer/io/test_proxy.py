"""The data path over real sockets: a Balancer in-process, demo and raw backends, real clients."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import resource
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest

from backends.app import PATTERN
from balancer.config import BackendSpec

H = b"Host: a.example\r\n"
GET = b"GET /echo HTTP/1.1\r\n" + H + b"\r\n"


def url(bal, path: str) -> str:  # type: ignore[no-untyped-def]
    host, port = bal.address
    return f"http://{host}:{port}{path}"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # auto_decompress off: we compare bytes; no cookie jar mixing between requests
    async with aiohttp.ClientSession(
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=60),
    ) as s:
        yield s


def echo_headers(body: bytes) -> list[tuple[str, str]]:
    return [(n, v) for n, v in json.loads(body)["headers"]]


def closed_port() -> int:
    """A loopback port nobody listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- keep-alive and pooling


async def test_keepalive_both_sides_reuses_one_backend_connection(
    start_balancer, raw_backend, raw_client, read_helpers
):  # type: ignore[no-untyped-def]
    backend = await raw_backend()
    bal = await start_balancer([backend])
    client = raw_client(bal)
    reader, writer = await client.open()
    for i in range(5):
        writer.write(b"GET /%d HTTP/1.1\r\n" % i + H + b"\r\n")
        _, resps = await read_helpers.responses(reader, 1)
        assert resps[0].status == 200 and resps[0].header(b"connection") is None
    # a second client connection is served from the same pooled backend connection
    _, resps = await client.request(GET)
    assert resps[0].status == 200
    assert len(backend.conns) == 1
    assert [r.target for r in backend.requests] == [b"/0", b"/1", b"/2", b"/3", b"/4", b"/echo"]
    assert bal.pool.counts(backend.spec.id) == (1, 1)


async def test_http10_client(start_balancer, make_backend, raw_client, read_helpers, parse):  # type: ignore[no-untyped-def]
    a = await make_backend("a")
    bal = await start_balancer([a])
    client = raw_client(bal)
    # plain 1.0: answered, then closed; a chunked backend body arrives close-delimited
    data, closed = await client.exchange(b"GET /bytes?n=1000&chunked=1 HTTP/1.0\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert closed and head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
    assert body == PATTERN[:1000]
    # 1.0 with keep-alive and a sized body stays open
    reader, writer = await client.open()
    for _ in range(2):
        writer.write(b"GET /bytes?n=10 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        _, resps = await read_helpers.responses(reader, 1)
        assert resps[0].status == 200 and resps[0].body == PATTERN[:10]
    # the backend always gets HTTP/1.1 without a Host when the client sent none
    data, _ = await client.exchange(b"GET /echo HTTP/1.0\r\n\r\n")
    info = json.loads(data.partition(b"\r\n\r\n")[2])
    assert info["http_version"] == "1.1"


async def test_pool_limit_queues_then_serves(start_balancer, raw_backend, session):  # type: ignore[no-untyped-def]
    backend = await raw_backend()
    backend.delay = 0.2
    bal = await start_balancer(
        [backend], limits={"backend_max_connections": 2}, timeouts={"queue": 10.0}
    )

    async def one(i: int) -> int:
        async with session.get(url(bal, f"/{i}")) as r:
            await r.read()
            return r.status

    statuses = await asyncio.gather(*(one(i) for i in range(6)))
    assert statuses == [200] * 6
    assert backend.open_max == 2 and len(backend.conns) == 2
    assert len(backend.requests) == 6


async def test_pool_queue_full_is_503(start_balancer, raw_backend, session):  # type: ignore[no-untyped-def]
    backend = await raw_backend()
    backend.delay = 0.5
    bal = await start_balancer(
        [backend],
        limits={"backend_max_connections": 1, "queue_size": 1},
        timeouts={"queue": 10.0},
    )

    async def one(i: int) -> tuple[int, str]:
        async with session.get(url(bal, f"/{i}")) as r:
            return r.status, await r.text()

    results = await asyncio.gather(*(one(i) for i in range(4)))
    statuses = sorted(s for s, _ in results)
    assert statuses == [200, 200, 503, 503]
    assert all("queue full" in t for s, t in results if s == 503)


# ---------------------------------------------------------------- bodies


async def test_download_content_length_and_chunked(start_balancer, make_backend, session):  # type: ignore[no-untyped-def]
    a = await make_backend("a")
    bal = await start_balancer([a])
    n = 8 * 1024 * 1024 + 17
    for chunked in (0, 1):
        digest = hashlib.sha256()
        total = 0
        async with session.get(url(bal, f"/bytes?n={n}&chunked={chunked}")) as r:
            assert r.status == 200
            if chunked:
                assert r.headers.get("Transfer-Encoding") == "chunked"
            else:
                assert r.headers.get("Content-Length") == str(n)
            async for chunk in r.content.iter_any():
                digest.update(chunk)
                total += len(chunk)
        expect = hashlib.sha256((PATTERN * (n // len(PATTERN) + 1))[:n]).hexdigest()
        assert total == n and digest.hexdigest() == expect


async def test_upload_content_length_and_chunked(start_balancer, make_backend, session):  # type: ignore[no-untyped-def]
    a = await make_backend("a")
    bal = await start_balancer([a])
    block = bytes(range(256)) * 4096  # 1 MiB
    count = 16

    async def gen() -> AsyncIterator[bytes]:
        for _ in range(count):
            yield block

    expect = hashlib.sha256(block * count).hexdigest()
    # chunked: aiohttp streams an async generator with Transfer-Encoding: chunked
    async with session.post(url(bal, "/upload"), data=gen()) as r:
        assert r.status == 200
        assert await r.json() == {"bytes": len(block) * count, "sha256": expect}
    async with session.put(
        url(bal, "/upload"), data=gen(), headers={"Content-Length": str(len(block) * count)}
    ) as r:
        assert r.status == 200
        assert await r.json() == {"bytes": len(block) * count, "sha256": expect}


async def test_200mb_both_ways_in_bounded_memory(start_balancer, make_backend, session):  # type: ignore[no-untyped-def]
    """200 MB down and 200 MB up through the balancer; the test process's peak RSS (client,
    balancer and backend together) grows by far less than one body."""
    a = await make_backend("a")
    bal = await start_balancer([a])
    n = 200 * 1024 * 1024
    block = PATTERN * 16  # 1 MiB
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    total = 0
    async with session.get(url(bal, f"/bytes?n={n}")) as r:
        async for chunk in r.content.iter_chunked(1 << 20):
            total += len(chunk)
    assert total == n

    async def gen() -> AsyncIterator[bytes]:
        for _ in range(n // len(block)):
            yield block

    async with session.post(url(bal, "/upload"), data=gen()) as r:
        got = await r.json()
    assert got["bytes"] == n
    expect = hashlib.sha256()
    for _ in range(n // len(block)):
        expect.update(block)
    assert got["sha256"] == expect.hexdigest()
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak0
    assert growth < 64 * 1024 * 1024


async def test_slow_reader_pauses_the_backend(start_balancer, make_backend, raw_client):  # type: ignore[no-untyped-def]
    """A client that does not read: the balancer stops reading the backend, so what it pulled
    stays bounded by socket buffers, far below the body size."""
    a = await make_backend("a")
    bal = await start_balancer([a])
    n = 256 * 1024 * 1024
    reader, writer = await raw_client(bal).open()
    writer.write(b"GET /bytes?n=%d HTTP/1.1\r\n" % n + H + b"\r\n")
    await writer.drain()

    def pulled() -> int:
        return sum(c.current.bytes_out for c in bal.ctx.clients if c.current is not None)

    last, stable = -1, 0
    for _ in range(200):  # until the count stops moving (bounded: 200 x 50 ms)
        await asyncio.sleep(0.05)
        now = pulled()
        stable = stable + 1 if now == last else 0
        last = now
        if stable >= 6:
            break
    assert stable >= 6, "the balancer kept reading the backend"
    assert 0 < last < 48 * 1024 * 1024
    # reading resumes the flow: the next part of the body arrives intact
    got = await asyncio.wait_for(reader.readexactly(4 * 1024 * 1024), 10)
    body = got.partition(b"\r\n\r\n")[2]
    assert body and body == (PATTERN * (len(body) // len(PATTERN) + 1))[: len(body)]
    await asyncio.sleep(0.2)
    assert pulled() > last


async def test_backend_not_reading_pauses_the_client(start_balancer):  # type: ignore[no-untyped-def]
    """A backend that never reads: the client's upload stalls instead of piling up in memory."""
    accepted: list[asyncio.StreamWriter] = []

    async def never_read(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(w)

    server = await asyncio.start_server(never_read, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        bal = await start_balancer([BackendSpec("127.0.0.1", port)])
        _, writer = await asyncio.open_connection(*bal.address)
        writer.write(b"POST /upload HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % (1 << 30))
        block = b"x" * (1 << 20)
        sent = 0
        for _ in range(1024):
            writer.write(block)
            try:
                await asyncio.wait_for(writer.drain(), 1.0)
            except TimeoutError:
                break
            sent += len(block)
        assert sent < 64 * (1 << 20), "the balancer kept reading a client its backend ignores"
        writer.close()
    finally:
        for w in accepted:
            w.close()
        server.close()


# ---------------------------------------------------------------- headers


async def test_request_header_rewriting(start_balancer, make_backend, raw_client):  # type: ignore[no-untyped-def]
    a = await make_backend("a")
    bal = await start_balancer([a])
    raw = (
        b"GET /echo HTTP/1.1\r\n"
        b"Host: shop.example\r\n"
        b"Connection: keep-alive, X-Secret\r\n"
        b"X-Secret: drop me\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-T\r\n"
        b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        b"X-Forwarded-For: 10.0.0.1\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: spoofed.example\r\n"
        b"Forwarded: for=6.6.6.6\r\n"
        b"Via: 1.0 upstream-proxy\r\n"
        b"X-Request-Id: req-42\r\n"
        b"X-Keep: 1\r\n"
        b"x-keep: 2\r\n"
        b"\r\n"
    )
    _, resps = await raw_client(bal).request(raw)
    headers = echo_headers(resps[0].body)
    names = [n.lower() for n, _ in headers]
    for hop in ("connection", "x-secret", "keep-alive", "proxy-connection", "te", "trailer"):
        assert hop not in names, hop
    assert "proxy-authorization" not in names and "forwarded" not in names
    got = {n.lower(): v for n, v in headers}
    assert got["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    assert got["x-forwarded-proto"] == "http"
    assert got["x-forwarded-host"] == "shop.example"
    assert got["host"] == "shop.example"
    assert got["via"] == "1.0 upstream-proxy, 1.1 lb-testbed"
    assert got["x-request-id"] == "req-42"
    assert [(n, v) for n, v in headers if n.lower() == "x-keep"] == [
        ("X-Keep", "1"),
        ("x-keep", "2"),
    ]


async def test_request_id_created_and_forwarded_optional(start_balancer, make_backend, session):  # type: ignore[no-untyped-def]
    a = await make_backend("a")
    bal = await start_balancer([a], forwarded=True)
    ids = set()
    for _ in range(3):
        async with session.get(url(bal, "/echo"), headers={"Host": "h.example"}) as r:
            got = {n.lower(): v for n, v in echo_headers(await r.read())}
        ids.add(got["x-request-id"])
        assert got["forwarded"] == 'for=127.0.0.1;proto=http;host="h.example"'
    assert len(ids) == 3 and all(ids)
    plain = await start_balancer([a])
    async with session.get(url(plain, "/echo")) as r:
        assert "forwarded" not in {n.lower() for n, _ in echo_headers(await r.read())}


async def test_response_hop_by_hop_removed(start_balancer, raw_backend, raw_client):  # type: ignore[no-untyped-def]
    reply = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, X-Internal\r\n"
        b"X-Internal: secret\r\nKeep-Alive: timeout=60\r\nProxy-Authenticate: Basic\r\n"
        b"Trailer: X-T\r\nUpgrade: h2c\r\nX-App: yes\r\n"
        b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nok"
    )
    backend = await raw_backend(lambda req, conn: reply)
    bal = await start_balancer([backend])
    data, resps = await raw_client(bal).request(GET)
    head = data.partition(b"\r\n\r\n")[0].lower()
    for hop in (b"connection:", b"x-internal", b"keep-alive", b"proxy-authenticate", b"trailer"):
        assert hop not in head, hop
    assert b"upgrade" not in head
    assert resps[0].header(b"x-app") == b"yes" and resps[0].body == b"ok"
    assert [v for n, v in resps[0].headers if n.lower() == b"set-cookie"] == [b"a=1", b"b=2"]


# ---------------------------------------------------------------- framing


async def test_head_204_304_framing(start_balancer, raw_backend, raw_client, read_helpers, parse):  # type: ignore[no-untyped-def]
    def responder(req, conn):  # type: ignore[no-untyped-def]
        if req.target == b"/204":
            return b"HTTP/1.1 204 No Content\r\nX-N: 1\r\n\r\n"
        if req.target == b"/304":
            return b'HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\nETag: "e"\r\n\r\n'
        if req.method == b"HEAD":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody"

    backend = await raw_backend(responder)
    bal = await start_balancer([backend])
    reader, writer = await raw_client(bal).open()
    writer.write(b"HEAD /h HTTP/1.1\r\n" + H + b"\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 1000" in head
    for path in (b"/204", b"/304", b"/after"):
        writer.write(b"GET " + path + b" HTTP/1.1\r\n" + H + b"\r\n")
    _, resps = await read_helpers.responses(reader, 3)
    # nothing of a body after HEAD/204/304: the next responses parse cleanly in order
    assert [r.status for r in resps] == [204, 304, 200]
    assert resps[0].body == b"" and resps[1].body == b"" and resps[2].body == b"body"
    assert resps[0].header(b"transfer-encoding") is None
    assert len(backend.conns) == 1  # all on one backend connection


async def test_until_close_backend_body_is_chunked_for_11(start_balancer, raw_backend, raw_client):  # type: ignore[no-untyped-def]
    def responder(req, conn):  # type: ignore[no-untyped-def]
        conn.hangup = True
        return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close"

    backend = await raw_backend(responder)
    bal = await start_balancer([backend])
    reader, writer = await raw_client(bal).open()
    for _ in range(2):  # and the client connection stays usable
        writer.write(GET)
        data = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 10)
        assert b"Transfer-Encoding: chunked" in data
        assert data.endswith(b"\r\n\r\nb\r\nuntil close\r\n0\r\n\r\n")


async def test_websocket_tunnel(start_balancer, make_backend, session):  # type: ignore[no-untyped-def]
    a = await make_backend("a")
    bal = await start_balancer([a])
    async with session.ws_connect(url(bal, "/ws")) as ws:
        for i in range(3):
            await ws.send_str(f"hello {i}")
            assert (await ws.receive(timeout=10)).data == f"hello {i}"
        await ws.send_bytes(b"\x00\x01" * 40000)
        assert (await ws.receive(timeout=10)).data == b"\x00\x01" * 40000
    # the tunnel's backend connection is not pooled afterwards
    for _ in range(100):
        if bal.pool.counts(a.spec.id) == (0, 0):
            break
        await asyncio.sleep(0.05)
    assert bal.pool.counts(a.spec.id) == (0, 0)


# ---------------------------------------------------------------- timeouts


async def test_client_header_timeout_is_408(
    start_balancer, raw_backend, raw_client, read_helpers, parse
):  # type: ignore[no-untyped-def]
    backend = await raw_backend()
    bal = await start_balancer([backend], timeouts={"client_header": 0.3})
    reader, writer = await raw_client(bal).open()
    writer.write(b"GET / HTTP/1.1\r\nHost: slow")
    data, closed = await read_helpers.until_close(reader)
    resps = parse(data)
    assert closed and resps[0].status == 408 and resps[0].body.startswith(b"408 ")
    assert not backend.requests


async def test_idle_keepalive_closes(start_balancer, raw_backend, raw_client, read_helpers):  # type: ignore[no-untyped-def]
    backend = await raw_backend()
    bal = await start_balancer([backend], timeouts={"idle_keepalive": 0.3})
    reader, writer = await raw_client(bal).open()
    writer.write(GET)
    _, resps = await read_helpers.responses(reader, 1)
    assert resps[0].status == 200
    rest, closed = await read_helpers.until_close(reader)
    assert closed and rest == b""  # closed quietly, no 408 for an idle connection


async def test_backend_response_timeout_is_504(start_balancer, make_backend, session):  # type: ignore[no-untyped-def]
    a = await make_backend("a")
    bal = await start_balancer([a], timeouts={"backend_response": 0.3})
    async with session.get(url(bal, "/delay?ms=5000")) as r:
        assert r.status == 504 and (await r.text()).startswith("504 ")
    async with session.get(url(bal, "/")) as r:  # the next request is fine
        assert r.status == 200


async def test_connect_timeout(start_balancer, session):  # type: ignore[no-untyped-def]
    # a listener whose accept queue is full drops further SYNs: connect() never completes
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(lsock.getsockname())
            except BlockingIOError:
                pass
            fillers.append(s)
        await asyncio.sleep(0.1)
        port = lsock.getsockname()[1]
        bal = await start_balancer([BackendSpec("127.0.0.1", port)], timeouts={"connect": 0.3})
        async with session.get(url(bal, "/")) as r:
            assert r.status == 504 and "in time" in await r.text()
    finally:
        for s in fillers:
            s.close()
        lsock.close()


async def test_idle_backend_connections_are_closed(start_balancer, raw_backend, session):  # type: ignore[no-untyped-def]
    backend = await raw_backend()
    bal = await start_balancer([backend], timeouts={"backend_idle": 0.3})
    async with session.get(url(bal, "/")) as r:
        assert r.status == 200
    assert await backend.wait_for(lambda: backend.conns[0].closed)
    assert bal.pool.counts(backend.spec.id)[1] == 0


# ---------------------------------------------------------------- errors and failures


async def test_errors_keep_connection_usable(
    start_balancer, make_backend, raw_client, read_helpers
):  # type: ignore[no-untyped-def]
    a = await make_backend("a")
    dead = BackendSpec("127.0.0.1", closed_port())
    bal = await start_balancer([dead], retries={"attempts": 1})
    reader, writer = await raw_client(bal).open()
    writer.write(GET)
    _, resps = await read_helpers.responses(reader, 1)
    assert resps[0].status == 502 and resps[0].body.startswith(b"502 ")
    assert resps[0].header(b"connection") is None  # the request was read: keep-alive
    # 503 when nothing is enabled, on the same connection
    member = bal.cluster.backends[dead.id]
    member.admin_state = "maint"
    bal.cluster.invalidate()
    writer.write(GET)
    _, resps = await read_helpers.responses(reader, 1)
    assert resps[0].status == 503 and resps[0].header(b"retry-after") == b"1"
    assert resps[0].body.startswith(b"503 ")
    bal.apply(dataclasses.replace(bal.cfg, backends=(a.spec,)))
    writer.write(GET)
    _, resps = await read_helpers.responses(reader, 1)
    assert resps[0].status == 200


async def test_refused_backend_is_retried_elsewhere(start_balancer, make_backend, session):  # type: ignore[no-untyped-def]
    a = await make_backend("a")
    dead = BackendSpec("127.0.0.1", closed_port())
    bal = await start_balancer([dead, a.spec], outlier={"consecutive_failures": 1000})
    for _ in range(6):
        async with session.post(url(bal, "/echo"), data=b"body") as r:
            assert r.status == 200 and r.headers["X-Backend"] == "a"
    assert bal.cluster.backends[dead.id].errors_connect >= 1
    only_dead = await start_balancer([dead])
    async with session.get(url(only_dead, "/")) as r:
        assert r.status == 502 and (await r.text()).startswith("502 ")


def hangup(req, conn):  # type: ignore[no-untyped-def]
    return None  # close without answering


async def test_retry_goes_to_a_different_backend(start_balancer, raw_backend, session):  # type: ignore[no-untyped-def]
    bad = await raw_backend(hangup)
    good = await raw_backend()
    bal = await start_balancer([bad, good], outlier={"consecutive_failures": 1000})
    for i in range(4):
        async with session.get(url(bal, f"/{i}")) as r:
            assert r.status == 200
    assert len(good.requests) == 4
    # every request the bad one got was retried on the good one, never on itself
    assert {r.target for r in bad.requests} <= {r.target for r in good.requests}
    # with both failing: each tried once, then 502
    bad2 = await raw_backend(hangup)
    bal2 = await start_balancer([bad, bad2], outlier={"consecutive_failures": 1000})
    async with session.get(url(bal2, "/x")) as r:
        assert r.status == 502
    assert [r.target for r in bad.requests].count(b"/x") == 1
    assert [r.target for r in bad2.requests] == [b"/x"]


async def test_post_that_reached_a_backend_is_not_retried(start_balancer, raw_backend, session):  # type: ignore[no-untyped-def]
    a = await raw_backend(hangup)
    b = await raw_backend(hangup)
    bal = await start_balancer([a, b], outlier={"consecutive_failures": 1000})
    async with session.post(url(bal, "/pay"), data=b"x" * 1000) as r:
        assert r.status == 502
    got = [r for r in a.requests + b.requests]
    assert len(got) == 1 and got[0].body == b"x" * 1000


async def test_backend_closing_mid_response_aborts_client(
    start_balancer, raw_backend, raw_client, parse
):  # type: ignore[no-untyped-def]
    def responder(req, conn):  # type: ignore[no-untyped-def]
        conn.hangup = True
        if req.target == b"/chunked":
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        return b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10

    backend = await raw_backend(responder)
    bal = await start_balancer([backend])
    for path in (b"/sized", b"/chunked"):
        data, closed = await raw_client(bal).exchange(
            b"GET " + path + b" HTTP/1.1\r\n" + H + b"\r\n"
        )
        resps = parse(data)
        assert closed and len(resps) == 1
        assert not resps[0].complete, "a truncated body must never look complete"
        assert resps[0].status == 200


async def test_bad_request_then_others_still_served(
    start_balancer, make_backend, raw_client, parse, session
):  # type: ignore[no-untyped-def]
    a = await make_backend("a")
    bal = await start_balancer([a], limits={"max_request_body": 100})
    client = raw_client(bal)
    cases = {
        400: b"GET / HTTP/1.1\r\n" + H + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n",
        413: b"POST /upload HTTP/1.1\r\n" + H + b"Content-Length: 1000\r\n\r\n" + b"x" * 1000,
        414: b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n",
        431: b"GET / HTTP/1.1\r\n" + H + b"X: " + b"y" * 40000 + b"\r\n\r\n",
    }
    for status, raw in cases.items():
        data, closed = await client.exchange(raw)
        resps = parse(data)
        assert closed and resps[0].status == status, data[:200]
        assert resps[0].body.startswith(b"%d " % status)
        async with session.get(url(bal, "/")) as r:
            assert r.status == 200


# ---------------------------------------------------------------- schedulers through the proxy


async def test_round_robin_alternates(start_balancer, make_backend, session):  # type: ignore[no-untyped-def]
    a, b = await make_backend("a"), await make_backend("b")
    bal = await start_balancer([a, b], algorithm="round-robin")
    seen = []
    for _ in range(6):
        async with session.get(url(bal, "/")) as r:
            seen.append(r.headers["X-Backend"])
    assert seen[0::2] == [seen[0]] * 3 and seen[1::2] == [seen[1]] * 3 and seen[0] != seen[1]


async def test_source_hash_sticks_per_user(start_balancer, make_backend, session):  # type: ignore[no-untyped-def]
    a, b = await make_backend("a"), await make_backend("b")
    bal = await start_balancer([a, b], algorithm="source-hash", hash_key="header:X-User")
    chosen: dict[str, set[str]] = {}
    for _ in range(3):
        for user in range(16):
            async with session.get(url(bal, "/"), headers={"X-User": f"user-{user}"}) as r:
                chosen.setdefault(f"user-{user}", set()).add(r.headers["X-Backend"])
    assert all(len(v) == 1 for v in chosen.values())
    assert set().union(*chosen.values()) == {"a", "b"}


async def test_least_connections_prefers_idle_backend(start_balancer, make_backend, session):  # type: ignore[no-untyped-def]
    a, b = await make_backend("a"), await make_backend("b")
    bal = await start_balancer([a, b], algorithm="least-connections")
    slow = asyncio.ensure_future(session.get(url(bal, "/delay?ms=1500")))
    try:
        for _ in range(100):  # wait (bounded) until the slow request is in flight
            if any(m.in_flight for m in bal.cluster.backends.values()):
                break
            await asyncio.sleep(0.01)
        busy = next(m for m in bal.cluster.backends.values() if m.in_flight)
        seen = []
        for _ in range(5):
            async with session.get(url(bal, "/")) as r:
                seen.append(r.headers["X-Backend"])
        idle_name = "a" if busy.id == b.spec.id else "b"
        assert seen == [idle_name] * 5
    finally:
        r = await slow
        assert r.status == 200
        r.release()


async def test_expect_100_continue_with_aiohttp(start_balancer, make_backend, session):  # type: ignore[no-untyped-def]
    a = await make_backend("a")
    bal = await start_balancer([a])
    async with session.post(url(bal, "/upload"), data=b"x" * 100_000, expect100=True) as r:
        assert r.status == 200 and (await r.json())["bytes"] == 100_000
