"""The demo backend: a small aiohttp application a balancer can be pointed at.

Every response the application produces carries ``X-Backend: NAME`` so tests and drills can
tell which backend answered. Bodies are streamed both ways, so uploads and downloads of any
size pass through without being held in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import WSCloseCode, WSMsgType, web

BACKEND_HEADER = "X-Backend"
MAX_DELAY_MS = 60_000
MAX_BYTES = 10 * 1024**3
CHUNK_SIZE = 64 * 1024
# Byte i of every /bytes body is i % 256, so clients can check integrity at any offset.
PATTERN = bytes(range(256)) * (CHUNK_SIZE // 256)


@dataclass
class Health:
    """Mutable health flag shared by /healthz and /admin/health."""

    healthy: bool = True


NAME_KEY = web.AppKey("backend_name", str)
DELAY_KEY = web.AppKey("backend_delay_ms", int)
HEALTH_KEY = web.AppKey("backend_health", Health)
_Sockets = weakref.WeakSet[web.WebSocketResponse]
SOCKETS_KEY: web.AppKey[_Sockets] = web.AppKey("backend_websockets")
# --accept-proxy: the client address each connection's PROXY header carried, by the
# connection's own peer address (unique while it is open; bounded, oldest dropped first)
PROXIED_KEY: web.AppKey[dict[tuple[str, int], str | None]] = web.AppKey("backend_proxied")
PROXIED_MAX = 4096

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def validate_name(name: str) -> str:
    """A backend name must be a non-empty, printable ASCII header value."""
    if not name or len(name) > 64 or not all(0x21 <= ord(c) <= 0x7E for c in name):
        raise ValueError("name must be 1-64 printable ASCII characters without spaces")
    return name


def parse_int(raw: str | None, what: str, lo: int, hi: int, default: int | None = None) -> int:
    """Parse a decimal integer in [lo, hi]; raise a 400 with a short text body otherwise."""
    if raw is None:
        if default is not None:
            return default
        raise _bad_request(f"missing {what}")
    raw = raw.strip()
    # isdecimal() refuses signs, spaces and non-ASCII digits int() would accept.
    if not raw.isascii() or not raw.isdecimal() or len(raw) > 20:
        raise _bad_request(f"{what} must be an integer in {lo}..{hi}")
    value = int(raw)
    if not lo <= value <= hi:
        raise _bad_request(f"{what} must be an integer in {lo}..{hi}")
    return value


def parse_flag(raw: str | None, what: str) -> bool:
    """Parse an optional 0/1 style boolean; raise a 400 otherwise."""
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise _bad_request(f"{what} must be 0 or 1")


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=message + "\n")


def _text(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status)


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    # Signals fire for handler responses, HTTP exceptions (404, 405, 400) and 500s alike.
    response.headers[BACKEND_HEADER] = request.app[NAME_KEY]


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    proxied = request.app[PROXIED_KEY]
    if proxied and request.transport is not None:
        peer = request.transport.get_extra_info("peername")
        client = proxied.get((peer[0], peer[1])) if isinstance(peer, tuple) else None
        if client is not None:  # the address the PROXY header carried is the client
            request = request.clone(remote=client)
    delay_ms = request.app[DELAY_KEY]
    if delay_ms:
        await asyncio.sleep(delay_ms / 1000)
    try:
        return await handler(request)
    except ConnectionError:
        # The client went away mid-body (drills do this on purpose): not worth a traceback.
        # This response is never delivered; aiohttp sees the dead transport and drops it.
        return web.Response(status=400, text="client disconnected\n")


async def index(request: web.Request) -> web.Response:
    return _text(f"hello from {request.app[NAME_KEY]}\n")


async def echo(request: web.Request) -> web.Response:
    received = 0
    async for chunk in request.content.iter_any():
        received += len(chunk)
    # Raw header bytes keep order, duplicates and the sender's spelling; latin-1 never fails.
    headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers]
    peer = request.transport.get_extra_info("peername") if request.transport else None
    body = {
        "backend": request.app[NAME_KEY],
        "method": request.method,
        "path": request.rel_url.raw_path,
        "query": request.rel_url.raw_query_string,
        "headers": headers,
        "client": request.remote,
        "client_port": peer[1] if isinstance(peer, tuple) and len(peer) >= 2 else None,
        "scheme": request.scheme,
        "http_version": f"{request.version.major}.{request.version.minor}",
        "body_bytes": received,
    }
    return web.json_response(body)


async def delay(request: web.Request) -> web.Response:
    ms = parse_int(request.query.get("ms"), "ms", 0, MAX_DELAY_MS)
    await asyncio.sleep(ms / 1000)
    return _text(f"delayed {ms} ms\n")


async def send_bytes(request: web.Request) -> web.StreamResponse:
    n = parse_int(request.query.get("n"), "n", 0, MAX_BYTES)
    chunked = parse_flag(request.query.get("chunked"), "chunked")
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if chunked:
        response.enable_chunked_encoding()
    else:
        response.content_length = n
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    view = memoryview(PATTERN)
    remaining = n
    try:
        while remaining > 0:
            size = min(remaining, CHUNK_SIZE)
            # write() drains when the transport buffer is full, so memory stays bounded.
            await response.write(view[:size])
            remaining -= size
        await response.write_eof()
    except ConnectionError:
        # The client went away mid-body (drills do this on purpose): not a server error.
        pass
    return response


async def status(request: web.Request) -> web.Response:
    code = parse_int(request.match_info["code"], "status code", 200, 599)
    if code in (204, 304):
        return web.Response(status=code)
    return _text(f"status {code}\n", status=code)


async def healthz(request: web.Request) -> web.Response:
    if request.app[HEALTH_KEY].healthy:
        return _text("ok\n")
    return _text("failing\n", status=503)


async def get_health(request: web.Request) -> web.Response:
    return web.json_response({"healthy": request.app[HEALTH_KEY].healthy})


async def set_health(request: web.Request) -> web.Response:
    raw_query = request.query.get("healthy")
    if raw_query is not None:
        healthy = parse_flag(raw_query, "healthy")
    else:
        # The flag is tiny; refuse large bodies instead of buffering them.
        data = await request.content.read(4097)
        if len(data) > 4096:
            raise _bad_request("body too large")
        try:
            parsed = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise _bad_request('body must be JSON like {"healthy": false}') from None
        value = parsed.get("healthy") if isinstance(parsed, dict) else None
        if not isinstance(value, bool):
            raise _bad_request('body must be JSON like {"healthy": false}')
        healthy = value
    request.app[HEALTH_KEY].healthy = healthy
    return web.json_response({"healthy": healthy})


async def upload(request: web.Request) -> web.Response:
    digest = hashlib.sha256()
    received = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        received += len(chunk)
    return web.json_response({"bytes": received, "sha256": digest.hexdigest()})


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    sockets = request.app[SOCKETS_KEY]
    sockets.add(ws)
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
    finally:
        sockets.discard(ws)
    return ws


async def _close_websockets(app: web.Application) -> None:
    # Without this, shutdown would wait for open sockets until the shutdown timeout.
    sockets = app[SOCKETS_KEY]
    for ws in list(sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"backend shutting down")


def make_app(name: str, delay_ms: int = 0) -> web.Application:
    """Build the backend application; ``delay_ms`` delays every response (slow backend)."""
    validate_name(name)
    if not 0 <= delay_ms <= MAX_DELAY_MS:
        raise ValueError(f"delay_ms must be in 0..{MAX_DELAY_MS}")
    app = web.Application(middlewares=[_middleware])
    app[NAME_KEY] = name
    app[DELAY_KEY] = delay_ms
    app[HEALTH_KEY] = Health()
    app[SOCKETS_KEY] = weakref.WeakSet()
    app[PROXIED_KEY] = {}
    app.on_response_prepare.append(_on_prepare)
    app.on_shutdown.append(_close_websockets)
    app.router.add_get("/", index)
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/delay", delay)
    app.router.add_get("/bytes", send_bytes)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/admin/health", get_health)
    app.router.add_post("/admin/health", set_health)
    app.router.add_post("/upload", upload)
    app.router.add_put("/upload", upload)
    app.router.add_get("/ws", websocket)
    return app


def set_healthy(app: web.Application, healthy: bool) -> None:
    """Flip the health flag of a running app (what POST /admin/health does)."""
    app[HEALTH_KEY].healthy = healthy
