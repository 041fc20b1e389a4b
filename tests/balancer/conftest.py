"""Shared fixtures for the data-path tests: an in-process Balancer, demo backends, a raw backend.

Only fixtures here (no `from conftest import`): several conftest.py files share that module
name. Helpers that tests need are handed out as fixture values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import httptools
import pytest

from balancer.app import Balancer
from balancer.config import BackendSpec, Config, HealthCheckSettings, Timeouts
from harness import BackendProc, BalancerProc, Harness, RunningBackend, run_backend

IO_TIMEOUT = 10.0  # upper bound on every single socket wait; tests never sleep this long


# ---------------------------------------------------------------- demo backends


class DemoBackend(RunningBackend):
    """The harness's in-process backend, plus the balancer's view of it."""

    @property
    def spec(self) -> BackendSpec:
        return BackendSpec(self.host, self.port)


@pytest.fixture
async def make_backend() -> AsyncIterator[Callable[..., Awaitable[DemoBackend]]]:
    """`await make_backend("a", delay_ms=0)`: an aiohttp demo backend on 127.0.0.1:0."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(name: str, delay_ms: int = 0) -> DemoBackend:
            b = await stack.enter_async_context(
                run_backend(name, delay_ms=delay_ms, shutdown_timeout=1.0)
            )
            return DemoBackend(b.name, b.host, b.port, b.url, b.app)

        yield make


# ---------------------------------------------------------------- the balancer


def make_config(specs: list[BackendSpec], **overrides: Any) -> Config:
    """A test Config: listener on port 0, checks off, short timeouts; `timeouts=`/`limits=`
    /`health_check=` may be dicts of field overrides."""
    cfg = Config(
        listen="127.0.0.1:0",
        backends=tuple(specs),
        health_check=HealthCheckSettings(enabled=False),
        timeouts=Timeouts(connect=1.0, client_header=5.0, idle_keepalive=5.0),
    )
    for key, cls_value in (
        ("timeouts", cfg.timeouts),
        ("limits", cfg.limits),
        ("health_check", cfg.health_check),
        ("retries", cfg.retries),
        ("outlier", cfg.outlier),
    ):
        if isinstance(overrides.get(key), dict):
            overrides[key] = replace(cls_value, **overrides[key])
    return replace(cfg, **overrides)


@pytest.fixture
def config_for() -> Callable[..., Config]:
    """`config_for([spec, ...], timeouts={...}, algorithm=...)` -> Config (see make_config)."""
    return make_config


@pytest.fixture
async def start_balancer() -> AsyncIterator[Callable[..., Awaitable[Balancer]]]:
    """`await start_balancer(backends_or_specs, **overrides)`: a started in-process Balancer."""
    started: list[Balancer] = []

    async def start(backends: list[Any], **overrides: Any) -> Balancer:
        specs = [b if isinstance(b, BackendSpec) else b.spec for b in backends]
        load_config = overrides.pop("load_config", None)
        cfg = overrides.pop("cfg", None) or make_config(specs, **overrides)
        bal = Balancer(cfg, load_config=load_config)
        await bal.start()
        started.append(bal)
        return bal

    yield start
    for bal in reversed(started):
        bal.cfg = replace(bal.cfg, timeouts=replace(bal.cfg.timeouts, shutdown_grace=1.0))
        await bal.stop()


# ---------------------------------------------------------------- a raw recording backend


@dataclass
class ParsedRequest:
    method: bytes
    target: bytes
    version: str
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    complete: bool = False

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


class _ReqSink:
    """httptools callbacks collecting requests as they are parsed."""

    def __init__(self, on_complete: Callable[[ParsedRequest], None]) -> None:
        self.requests: list[ParsedRequest] = []
        self.begun = 0  # messages started, even if their head never completed
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._on_complete = on_complete
        self.parser = httptools.HttpRequestParser(self)

    def on_message_begin(self) -> None:
        self.begun += 1
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        p = self.parser
        self.requests.append(
            ParsedRequest(p.get_method(), self._url, p.get_http_version(), self._headers)
        )

    def on_body(self, body: bytes) -> None:
        self.requests[-1].body += body

    def on_message_complete(self) -> None:
        self.requests[-1].complete = True
        self._on_complete(self.requests[-1])


@dataclass
class RawConn:
    """What one backend connection delivered to the raw backend."""

    data: bytes = b""
    requests: list[ParsedRequest] = field(default_factory=list)
    parse_error: str | None = None
    closed: bool = False
    begun: int = 0  # requests started on this connection (complete or not)
    hangup: bool = False  # a responder sets this to close right after its reply


OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"

# responder(request, conn) -> bytes to send, or None to close the connection without answering
Responder = Callable[[ParsedRequest, RawConn], "bytes | None"]


class RawBackend:
    """An asyncio server that records the exact bytes of each connection, parses them with
    httptools (strict llhttp) and answers a fixed valid response per complete request."""

    def __init__(self, responder: Responder | None = None) -> None:
        self.responder: Responder = responder or (lambda req, conn: OK_RESPONSE)
        self.conns: list[RawConn] = []
        self.server: asyncio.Server | None = None
        self.port = 0
        self.host = "127.0.0.1"
        self.changed = asyncio.Event()
        self.delay = 0.0  # seconds before each batch of replies (a slow backend)
        self.open_now = 0  # connections currently open
        self.open_max = 0
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def spec(self) -> BackendSpec:
        return BackendSpec(self.host, self.port)

    @property
    def requests(self) -> list[ParsedRequest]:
        return [r for c in self.conns for r in c.requests]

    async def start(self) -> RawBackend:
        self.server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in self._writers:
            w.close()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2.0)

    async def wait_for(self, pred: Callable[[], bool], timeout: float = IO_TIMEOUT) -> bool:
        """Wait (bounded) until pred() holds; returns its final value."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not pred():
            left = end - loop.time()
            if left <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.05))
        return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = RawConn()
        self.conns.append(conn)
        self.open_now += 1
        self.open_max = max(self.open_max, self.open_now)
        self._writers.append(writer)
        replies: list[bytes | None] = []
        sink = _ReqSink(lambda req: replies.append(self.responder(req, conn)))
        conn.requests = sink.requests
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                conn.data += data
                try:
                    sink.parser.feed_data(data)
                except httptools.HttpParserUpgrade:
                    pass  # the request parsed; what follows is tunnel bytes, recorded above
                except httptools.HttpParserError as exc:
                    conn.parse_error = str(exc) or type(exc).__name__
                    break
                finally:
                    conn.begun = sink.begun
                    self.changed.set()
                if replies and self.delay:
                    await asyncio.sleep(self.delay)
                stop = conn.hangup
                for reply in replies:
                    if reply is None:
                        stop = True
                        break
                    writer.write(reply)
                replies.clear()
                await writer.drain()
                if stop:
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            conn.closed = True
            self.open_now -= 1
            self.changed.set()
            writer.close()


@pytest.fixture
async def raw_backend() -> AsyncIterator[Callable[..., Awaitable[RawBackend]]]:
    """`await raw_backend(responder=None)`: a started RawBackend (see the class)."""
    made: list[RawBackend] = []

    async def make(responder: Responder | None = None) -> RawBackend:
        rb = await RawBackend(responder).start()
        made.append(rb)
        return rb

    yield make
    for rb in made:
        await rb.stop()


# ---------------------------------------------------------------- raw clients


@dataclass
class ParsedResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    complete: bool = False

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None


class _RespSink:
    def __init__(self) -> None:
        self.responses: list[ParsedResponse] = []
        self.parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []

    def on_message_begin(self) -> None:
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.responses.append(ParsedResponse(self.parser.get_status_code(), self._headers))

    def on_body(self, body: bytes) -> None:
        self.responses[-1].body += body

    def on_message_complete(self) -> None:
        self.responses[-1].complete = True


def parse_responses(data: bytes, head_requests: int = 0) -> list[ParsedResponse]:
    """Every response in `data`, in order (the last may be incomplete). The first
    `head_requests` responses are treated as answers to HEAD (no body)."""
    out: list[ParsedResponse] = []
    rest = data
    # httptools cannot be told about HEAD: split those heads off by hand first
    for _ in range(head_requests):
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            break
        status_line, *lines = head.split(b"\r\n")
        headers = [(n, v.strip()) for n, _, v in (ln.partition(b":") for ln in lines)]
        out.append(ParsedResponse(int(status_line.split(b" ")[1]), headers, b"", True))
    sink = _RespSink()
    with contextlib.suppress(httptools.HttpParserError):
        # UNTIL_CLOSE bodies only complete at EOF, which feed_data cannot express
        sink.parser.feed_data(rest)
    return out + sink.responses


@pytest.fixture
def parse() -> Callable[..., list[ParsedResponse]]:
    return parse_responses


async def read_until_close(
    reader: asyncio.StreamReader, timeout: float = IO_TIMEOUT
) -> tuple[bytes, bool]:
    """Read until EOF/reset or timeout; returns (data, closed_by_peer)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    data = b""
    while True:
        left = end - loop.time()
        if left <= 0:
            return data, False
        try:
            chunk = await asyncio.wait_for(reader.read(65536), left)
        except TimeoutError:
            return data, False
        except (ConnectionError, OSError):
            return data, True
        if not chunk:
            return data, True
        data += chunk


async def read_responses(
    reader: asyncio.StreamReader, count: int, timeout: float = IO_TIMEOUT
) -> tuple[bytes, list[ParsedResponse]]:
    """Read until `count` complete responses arrived (or EOF/timeout)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    data = b""
    while True:
        resps = parse_responses(data)
        if len([r for r in resps if r.complete]) >= count:
            return data, resps
        left = end - loop.time()
        if left <= 0:
            return data, resps
        try:
            chunk = await asyncio.wait_for(reader.read(65536), left)
        except (TimeoutError, ConnectionError, OSError):
            return data, resps
        if not chunk:
            return data, resps
        data += chunk


class RawClient:
    """Raw-socket client helpers bound to one balancer address."""

    def __init__(self, addr: tuple[str, int]) -> None:
        self.addr = addr
        self.writers: list[asyncio.StreamWriter] = []

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*self.addr), IO_TIMEOUT)
        self.writers.append(writer)
        return reader, writer

    async def exchange(self, data: bytes, timeout: float = IO_TIMEOUT) -> tuple[bytes, bool]:
        """Send `data` on a fresh connection, read until the balancer closes it."""
        reader, writer = await self.open()
        writer.write(data)
        await writer.drain()
        return await read_until_close(reader, timeout)

    async def request(
        self, data: bytes, count: int = 1, timeout: float = IO_TIMEOUT
    ) -> tuple[bytes, list[ParsedResponse]]:
        """Send `data` on a fresh connection, read `count` complete responses."""
        reader, writer = await self.open()
        writer.write(data)
        await writer.drain()
        return await read_responses(reader, count, timeout)

    def close(self) -> None:
        for w in self.writers:
            w.close()


@pytest.fixture
async def raw_client() -> AsyncIterator[Callable[[Balancer], RawClient]]:
    """`raw_client(balancer)` -> RawClient for its listener; connections closed at teardown."""
    clients: list[RawClient] = []

    def make(bal: Balancer) -> RawClient:
        c = RawClient(bal.address)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def read_helpers() -> Any:
    """read_until_close / read_responses for tests that manage their own streams."""

    class H:
        until_close = staticmethod(read_until_close)
        responses = staticmethod(read_responses)

    return H


class ErrorLogCatcher(logging.Handler):
    """Collects ERROR records with tracebacks from the balancer's loggers and asyncio."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def error_logs() -> Iterator[ErrorLogCatcher]:
    catcher = ErrorLogCatcher()
    loggers = [logging.getLogger(n) for n in ("balancer", "asyncio")]
    for lg in loggers:
        lg.addHandler(catcher)
    yield catcher
    for lg in loggers:
        lg.removeHandler(catcher)


@pytest.fixture
def backend(harness: Harness) -> Callable[..., BackendProc]:
    """`backend(name, **kw)`: a ready `python -m backends` child, stopped at teardown."""
    return harness.backend


@pytest.fixture
def balancer(harness: Harness) -> Iterator[Callable[..., BalancerProc]]:
    """`balancer(*args, name="lb", admin=None, listens=True)`: a ready `python -m balancer
    ARGS` child (see harness.BalancerProc), stopped at teardown; none may have printed a
    traceback."""
    started: list[BalancerProc] = []

    def start(
        *args: str, name: str = "lb", admin: bool | None = None, listens: bool = True
    ) -> BalancerProc:
        b = harness.balancer(*args, name=name, admin=admin, listens=listens)
        started.append(b)
        return b

    yield start
    for b in started:
        b.stop()
    for b in started:
        assert "Traceback" not in b.output(), b.output()


@pytest.fixture
def pair_status() -> Callable[[dict[str, Any]], Any]:
    """`bal.pair = pair_status({...})`: stands in for the pair, whose status the balancer
    reads when asked (and stops with it)."""

    class PairStatus:
        def __init__(self, status: dict[str, Any]) -> None:
            self._status = status

        def status(self) -> dict[str, Any]:
            return self._status

        async def stop(self) -> None:
            pass

    return PairStatus
