"""The backend's endpoints, served in-process by harness.run_backend."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from backends import BACKEND_HEADER, make_app
from backends.app import PATTERN, parse_flag, parse_int, validate_name
from harness import RunningBackend, run_backend

MB = 1024 * 1024


@pytest.fixture
async def backend() -> AsyncIterator[RunningBackend]:
    async with run_backend("b1") as b:
        yield b


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_index(backend: RunningBackend, session: aiohttp.ClientSession) -> None:
    async with session.get(backend.url + "/") as r:
        assert r.status == 200
        assert r.headers[BACKEND_HEADER] == "b1"
        assert await r.text() == "hello from b1\n"
    assert backend.port > 0
    assert backend.url == f"http://127.0.0.1:{backend.port}"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/", 200),
        ("GET", "/nope", 404),
        ("POST", "/", 405),
        ("GET", "/delay?ms=x", 400),
        ("GET", "/status/503", 503),
        ("GET", "/status/204", 204),
        ("GET", "/bytes?n=-1", 400),
        ("POST", "/admin/health?healthy=maybe", 400),
        ("GET", "/ws", 400),  # not an upgrade request
        ("HEAD", "/bytes?n=10", 200),
    ],
)
async def test_every_response_names_the_backend(
    backend: RunningBackend, session: aiohttp.ClientSession, method: str, path: str, status: int
) -> None:
    async with session.request(method, backend.url + path) as r:
        assert r.status == status
        assert r.headers[BACKEND_HEADER] == "b1"


async def test_echo_reports_what_was_received(
    backend: RunningBackend, session: aiohttp.ClientSession
) -> None:
    headers = CIMultiDict([("X-Dup", "one"), ("X-Other", "x"), ("X-Dup", "two")])
    async with session.post(
        backend.url + "/echo/../echo?a=1&a=2&b=%20", data=b"z" * 1000, headers=headers
    ) as r:
        assert r.status == 200
        assert r.headers[BACKEND_HEADER] == "b1"
        body = await r.json()
    assert body["method"] == "POST"
    assert body["path"] == "/echo"
    assert body["query"] == "a=1&a=2&b=%20"
    assert body["body_bytes"] == 1000
    assert body["client"] == "127.0.0.1"
    assert isinstance(body["client_port"], int)
    assert body["backend"] == "b1"
    sent = [h for h in body["headers"] if h[0].lower().startswith("x-")]
    assert sent == [["X-Dup", "one"], ["X-Other", "x"], ["X-Dup", "two"]]


async def test_echo_counts_a_large_streamed_body(
    backend: RunningBackend, session: aiohttp.ClientSession
) -> None:
    async def body() -> AsyncIterator[bytes]:
        for _ in range(50):
            yield b"\x00" * MB

    async with session.put(backend.url + "/echo", data=body()) as r:
        assert (await r.json())["body_bytes"] == 50 * MB


async def test_delay(backend: RunningBackend, session: aiohttp.ClientSession) -> None:
    start = time.monotonic()
    async with session.get(backend.url + "/delay?ms=50") as r:
        assert r.status == 200
        assert await r.text() == "delayed 50 ms\n"
    # A lower bound only (sleep never returns early by more than clock granularity).
    assert time.monotonic() - start >= 0.04


@pytest.mark.parametrize(
    "query", ["", "?ms=", "?ms=-1", "?ms=60001", "?ms=1.5", "?ms=abc", "?ms=%EF%BC%91"]
)
async def test_delay_rejects_bad_input(
    backend: RunningBackend, session: aiohttp.ClientSession, query: str
) -> None:
    async with session.get(backend.url + "/delay" + query) as r:
        assert r.status == 400
        text = await r.text()
    assert "ms" in text
    assert len(text) < 100


@pytest.mark.parametrize("n", [0, 1, 255, 256, 65535, 65536, 65537, 300_000])
async def test_bytes_content(
    backend: RunningBackend, session: aiohttp.ClientSession, n: int
) -> None:
    async with session.get(backend.url + f"/bytes?n={n}") as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == str(n)
        data = await r.read()
    assert data == bytes(i % 256 for i in range(n))


async def test_bytes_chunked(backend: RunningBackend, session: aiohttp.ClientSession) -> None:
    async with session.get(backend.url + "/bytes?n=200000&chunked=1") as r:
        assert r.status == 200
        assert r.headers["Transfer-Encoding"] == "chunked"
        assert "Content-Length" not in r.headers
        data = await r.read()
    assert data == (PATTERN * 4)[:200000]


async def test_bytes_streams_50_mb(backend: RunningBackend, session: aiohttp.ClientSession) -> None:
    n = 50 * MB + 7
    received = 0
    digest = hashlib.sha256()
    async with session.get(backend.url + f"/bytes?n={n}") as r:
        assert r.headers["Content-Length"] == str(n)
        async for chunk in r.content.iter_chunked(MB):
            received += len(chunk)
            digest.update(chunk)
    assert received == n
    expected = hashlib.sha256()
    for _ in range(n // len(PATTERN)):
        expected.update(PATTERN)
    expected.update(PATTERN[: n % len(PATTERN)])
    assert digest.hexdigest() == expected.hexdigest()


async def test_bytes_head_has_length_and_no_body(
    backend: RunningBackend, session: aiohttp.ClientSession
) -> None:
    async with session.head(backend.url + "/bytes?n=12345") as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == "12345"
        assert await r.read() == b""


@pytest.mark.parametrize(
    "query", ["", "?n=", "?n=-5", "?n=x", f"?n={10 * 1024**3 + 1}", "?n=10&chunked=2"]
)
async def test_bytes_rejects_bad_input(
    backend: RunningBackend, session: aiohttp.ClientSession, query: str
) -> None:
    async with session.get(backend.url + "/bytes" + query) as r:
        assert r.status == 400
        assert r.headers[BACKEND_HEADER] == "b1"


async def test_bytes_client_disconnect_is_quiet(
    backend: RunningBackend, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    async with aiohttp.ClientSession() as other:
        r = await other.get(backend.url + f"/bytes?n={1024 * MB}")
        await r.content.readexactly(MB)
        r.close()  # drop the connection mid-body
    # The next request on a fresh connection also lets the server notice the loss.
    async with session.get(backend.url + "/delay?ms=100") as r2:
        assert r2.status == 200
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]


@pytest.mark.parametrize("abort", [True, False])
@pytest.mark.parametrize(
    "head",
    [
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n",
        b"PUT /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n100000\r\n",
    ],
)
async def test_upload_client_disconnect_is_quiet(
    backend: RunningBackend,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    head: bytes,
    abort: bool,
) -> None:
    reader, writer = await asyncio.open_connection(backend.host, backend.port)
    writer.write(head + b"a" * 50_000)
    await writer.drain()
    # A /healthz round trip on another connection gives the server time to start the body.
    async with session.get(backend.url + "/healthz") as r:
        assert r.status == 200
    if abort:
        writer.transport.abort()  # RST
    else:
        writer.write_eof()  # FIN with the body cut short
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    async with session.get(backend.url + "/delay?ms=100") as r:
        assert r.status == 200
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]


@pytest.mark.parametrize("code", [200, 201, 301, 404, 418, 500, 502, 503, 599])
async def test_status(backend: RunningBackend, session: aiohttp.ClientSession, code: int) -> None:
    async with session.get(backend.url + f"/status/{code}", allow_redirects=False) as r:
        assert r.status == code
        assert r.headers[BACKEND_HEADER] == "b1"
        assert await r.text() == f"status {code}\n"


async def test_status_without_body(backend: RunningBackend, session: aiohttp.ClientSession) -> None:
    for code in (204, 304):
        async with session.get(backend.url + f"/status/{code}") as r:
            assert r.status == code
            assert await r.read() == b""


@pytest.mark.parametrize("code", ["100", "101", "199", "600", "99", "abc", "-200", "2000000"])
async def test_status_rejects_bad_codes(
    backend: RunningBackend, session: aiohttp.ClientSession, code: str
) -> None:
    async with session.get(backend.url + f"/status/{code}") as r:
        assert r.status == 400
        assert "status code" in await r.text()


async def test_health_flip(backend: RunningBackend, session: aiohttp.ClientSession) -> None:
    url = backend.url
    async with session.get(url + "/healthz") as r:
        assert (r.status, await r.text()) == (200, "ok\n")
    async with session.post(url + "/admin/health", json={"healthy": False}) as r:
        assert (r.status, await r.json()) == (200, {"healthy": False})
    async with session.get(url + "/healthz") as r:
        assert (r.status, await r.text()) == (503, "failing\n")
        assert r.headers[BACKEND_HEADER] == "b1"
    async with session.get(url + "/admin/health") as r:
        assert await r.json() == {"healthy": False}
    async with session.post(url + "/admin/health?healthy=1") as r:
        assert r.status == 200
    async with session.get(url + "/healthz") as r:
        assert r.status == 200
    async with session.post(url + "/admin/health?healthy=0") as r:
        assert r.status == 200
    async with session.get(url + "/healthz") as r:
        assert r.status == 503
    backend.set_healthy(True)
    async with session.get(url + "/healthz") as r:
        assert r.status == 200


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b'{"healthy": "no"}', b'{"healthy": 0}', b"[false]", b"{}", b"x" * 5000],
)
async def test_health_rejects_bad_bodies(
    backend: RunningBackend, session: aiohttp.ClientSession, body: bytes
) -> None:
    async with session.post(backend.url + "/admin/health", data=body) as r:
        assert r.status == 400
        assert len(await r.text()) < 100
    async with session.get(backend.url + "/admin/health") as r:
        assert await r.json() == {"healthy": True}


async def test_upload(backend: RunningBackend, session: aiohttp.ClientSession) -> None:
    payload = bytes(range(256)) * 1000
    for method in ("POST", "PUT"):
        async with session.request(method, backend.url + "/upload", data=payload) as r:
            assert r.status == 200
            assert r.headers[BACKEND_HEADER] == "b1"
            assert await r.json() == {
                "bytes": len(payload),
                "sha256": hashlib.sha256(payload).hexdigest(),
            }


async def test_upload_streams_50_mb(
    backend: RunningBackend, session: aiohttp.ClientSession
) -> None:
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for i in range(50):
            chunk = bytes([i]) * MB
            digest.update(chunk)
            yield chunk

    async with session.post(backend.url + "/upload", data=body()) as r:
        result = await r.json()
    assert result == {"bytes": 50 * MB, "sha256": digest.hexdigest()}


async def test_upload_empty_and_wrong_method(
    backend: RunningBackend, session: aiohttp.ClientSession
) -> None:
    async with session.post(backend.url + "/upload") as r:
        assert (await r.json())["bytes"] == 0
    async with session.get(backend.url + "/upload") as r:
        assert r.status == 405


async def test_websocket_echo(backend: RunningBackend, session: aiohttp.ClientSession) -> None:
    async with session.ws_connect(backend.url + "/ws") as ws:
        await ws.send_str("héllo")
        assert await ws.receive_str(timeout=5) == "héllo"
        blob = bytes(range(256)) * 1024
        await ws.send_bytes(blob)
        assert await ws.receive_bytes(timeout=5) == blob
        await ws.close()
    assert ws.closed


async def test_websocket_closed_on_shutdown(session: aiohttp.ClientSession) -> None:
    async with run_backend("b2") as b:
        ws = await session.ws_connect(b.url + "/ws")
    msg = await ws.receive(timeout=5)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    await ws.close()


async def test_delay_applies_to_every_response(session: aiohttp.ClientSession) -> None:
    async with run_backend("slow", delay_ms=60) as b:
        for path, status in (("/healthz", 200), ("/missing", 404)):
            start = time.monotonic()
            async with session.get(b.url + path) as r:
                assert r.status == status
                assert r.headers[BACKEND_HEADER] == "slow"
            assert time.monotonic() - start >= 0.05


async def test_concurrent_requests_are_served_in_parallel(
    backend: RunningBackend, session: aiohttp.ClientSession
) -> None:
    async def one(i: int) -> int:
        async with session.get(backend.url + f"/delay?ms={i}") as r:
            return r.status

    statuses = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(20))), 30)
    assert statuses == [200] * 20


def test_make_app_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        make_app("")
    with pytest.raises(ValueError):
        make_app("bad\r\nname")
    with pytest.raises(ValueError):
        make_app("b", delay_ms=-1)


@pytest.mark.parametrize("name", ["b1", "backend-2.example", "x" * 64])
def test_validate_name_accepts(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "é", "a\tb"])
def test_validate_name_refuses(name: str) -> None:
    with pytest.raises(ValueError):
        validate_name(name)


def test_parse_helpers() -> None:
    assert parse_int(" 5 ", "n", 0, 10) == 5
    assert parse_int(None, "n", 0, 10, default=3) == 3
    assert parse_flag(None, "f") is False
    assert parse_flag("TRUE", "f") is True
    for bad in ("+5", "5_0", "\u0661"):  # sign, underscore, Arabic-Indic digit
        with pytest.raises(aiohttp.web.HTTPBadRequest):
            parse_int(bad, "n", 0, 100)


async def test_make_app_works_with_aiohttp_test_utils() -> None:
    app = make_app("tu")

    async def boom(request: web.Request) -> web.Response:
        raise RuntimeError("deliberate failure")

    app.router.add_get("/boom", boom)
    async with TestClient(TestServer(app)) as client:
        r = await client.get("/")
        assert (r.status, r.headers[BACKEND_HEADER]) == (200, "tu")
        r = await client.get("/boom")
        # Unhandled handler errors become 500s and still name the backend.
        assert (r.status, r.headers[BACKEND_HEADER]) == (500, "tu")
