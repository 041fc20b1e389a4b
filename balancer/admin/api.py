"""The admin listener (aiohttp): JSON API, live dashboard, Server-Sent Events and /metrics.

Reads are open. Mutations (drain/enable/maint, weight, algorithm, reload) need one of:
- `Authorization: Bearer <token>` matching the contents of `admin.token_file`;
- a client certificate verified against `admin.client_ca` (admin listener over TLS);
- when neither a token file nor a client CA is configured: a loopback client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from balancer.admin.metrics import make_registry, render
from balancer.config import ALGORITHMS, ReloadResult, split_hostport
from balancer.lb.cluster import LATENCY_BUCKETS

log = logging.getLogger("balancer.admin")

STATIC_DIR = Path(__file__).parent / "static"
EVENTS_IN_STATE = 100
SSE_QUEUE_SIZE = 64  # messages buffered per SSE client before it counts as too slow
SSE_MAX_CLIENTS = 32
STATE_INTERVAL = 1.0
MAX_BODY = 4096
# The dashboard is self-contained: forbid every origin but our own.
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminError(Exception):
    """A request we refuse; becomes `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# pure cores -----------------------------------------------------------------------------
@dataclass(frozen=True)
class AuthPolicy:
    token: str | None  # None: no token file configured
    token_error: str | None  # the token file is configured but unusable
    mtls: bool  # verified client certificates are accepted


def authorize(
    policy: AuthPolicy, authorization: str | None, peer_cert: bool, remote: str | None
) -> None:
    """Raise AdminError unless this caller may mutate. No I/O."""
    if policy.mtls and peer_cert:
        return
    if policy.token is None and policy.token_error is None and not policy.mtls:
        if is_loopback(remote):
            return
        raise AdminError(403, "mutations are only allowed from loopback (no token configured)")
    if policy.token_error is not None:
        raise AdminError(503, policy.token_error)
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise AdminError(401, "missing bearer token")
    if policy.token is None or not hmac.compare_digest(
        given.strip().encode(), policy.token.encode()
    ):
        raise AdminError(401, "wrong bearer token")


def is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        addr = ipaddress.ip_address(remote)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def parse_weight(body: object) -> float:
    if not isinstance(body, dict) or "weight" not in body:
        raise AdminError(400, 'expected {"weight": W}')
    w = body["weight"]
    if isinstance(w, bool) or not isinstance(w, int | float) or not 0 < w <= 1000:
        raise AdminError(400, "weight must be a number in (0, 1000]")
    return float(w)


def parse_algorithm(body: object) -> str:
    if not isinstance(body, dict) or not isinstance(body.get("algorithm"), str):
        raise AdminError(400, 'expected {"algorithm": NAME}')
    name: str = body["algorithm"]
    if name not in ALGORITHMS:
        raise AdminError(400, f"unknown algorithm {name!r}; choose {', '.join(ALGORITHMS)}")
    return name


def load_token(path: str | None) -> tuple[str | None, str | None]:
    """(token, error): the file's stripped contents, or why it cannot be used."""
    if path is None:
        return None, None
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"admin token file unreadable: {exc.__class__.__name__}"
    if not token:
        return None, "admin token file is empty"
    return token, None


def _json(data: Any, compact: bool = False) -> str:
    if compact:
        return json.dumps(data, separators=(",", ":"), default=str)
    return json.dumps(data, indent=1, default=str)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# SSE ------------------------------------------------------------------------------------
class SSEClient:
    """One event-stream subscriber: a bounded queue; overflowing it drops the client."""

    __slots__ = ("dropped", "on_drop", "queue")

    def __init__(self, on_drop: Callable[[], None] | None = None) -> None:
        self.queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue(SSE_QUEUE_SIZE)
        self.dropped = False
        self.on_drop = on_drop  # aborts the connection: its handler may be stuck in a write

    def offer(self, kind: str, data: str) -> None:
        if self.dropped:
            return
        try:
            self.queue.put_nowait((kind, data))
        except asyncio.QueueFull:
            # a client that cannot keep up is cut off rather than buffered without bound
            self.dropped = True
            self.close()
            if self.on_drop is not None:
                self.on_drop()

    def close(self) -> None:
        with contextlib.suppress(asyncio.QueueEmpty):
            while True:
                self.queue.get_nowait()
        self.queue.put_nowait(None)


# the server -----------------------------------------------------------------------------
class AdminServer:
    """Runs the admin listener of one Balancer (typed loosely to avoid an import cycle)."""

    def __init__(self, balancer: Any) -> None:
        self.balancer = balancer
        self.registry = make_registry(balancer)
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.clients: set[SSEClient] = set()
        self.ticker: asyncio.Task[None] | None = None
        self.ssl_context = self._ssl_context()

    # life cycle ---------------------------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext | None:
        a = self.balancer.cfg.admin
        if not a.cert:
            if a.client_ca:
                log.error("admin.client_ca needs admin.cert/key (TLS); client certs are ignored")
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(a.cert, a.key)
        except (OSError, ssl.SSLError) as exc:
            # name the files: "[SSL] PEM lib" alone tells the user nothing
            raise OSError(f"admin TLS files {a.cert} / {a.key}: {exc}") from None
        if a.client_ca:
            # optional: reads stay open; a presented certificate must verify or the handshake fails
            ctx.verify_mode = ssl.CERT_OPTIONAL
            try:
                ctx.load_verify_locations(a.client_ca)
            except (OSError, ssl.SSLError) as exc:
                raise OSError(f"admin client CA {a.client_ca}: {exc}") from None
        return ctx

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=MAX_BODY)
        r = app.router
        r.add_get("/", self.dashboard)
        r.add_get("/healthz", self.healthz)
        r.add_get("/metrics", self.metrics)
        r.add_get("/api/state", self.state)
        r.add_get("/api/events", self.events)
        r.add_post("/api/backends/{id}/{action:drain|enable|maint}", self.backend_action)
        r.add_put("/api/backends/{id}/weight", self.backend_weight)
        r.add_put("/api/algorithm", self.algorithm)
        r.add_post("/api/reload", self.reload)
        r.add_get("/static/{name}", self.static)
        return app

    async def start(self) -> None:
        host, port = split_hostport(self.balancer.cfg.admin.listen, "admin")
        self.runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=self.ssl_context)
        await site.start()
        bound_host, bound_port = self.runner.addresses[0][:2]
        scheme = "https" if self.ssl_context is not None else "http"
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"{scheme}://{shown}:{bound_port}"
        self.balancer.event_listeners.append(self._on_event)
        self.ticker = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.balancer.event_listeners.remove(self._on_event)
        if self.ticker is not None:
            self.ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.ticker
            self.ticker = None
        for client in list(self.clients):
            client.close()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    # plumbing -----------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            resp = await handler(request)
        except AdminError as exc:
            return _error(exc.status, exc.message)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.status, exc.reason)
        except Exception:  # the admin API answers, it never shows a traceback
            log.exception("admin request failed: %s %s", request.method, request.path)
            return _error(500, "internal error")
        return resp

    def _policy(self) -> AuthPolicy:
        a = self.balancer.cfg.admin
        token, error = load_token(a.token_file)  # re-read: token rotation without restart
        # client_ca without TLS cannot see certificates: still counts, so loopback stays closed
        mtls = bool(a.client_ca)
        return AuthPolicy(token, error, mtls)

    def _authorize(self, request: web.Request) -> None:
        peer_cert = False
        if request.transport is not None:
            peer_cert = bool(request.transport.get_extra_info("peercert"))
        authorize(self._policy(), request.headers.get("Authorization"), peer_cert, request.remote)

    async def _body(self, request: web.Request) -> object:
        try:
            return await request.json()
        except (ValueError, UnicodeDecodeError):
            raise AdminError(400, "body is not valid JSON") from None

    def _backend(self, request: web.Request) -> Any:
        bid = request.match_info["id"]
        backend = self.balancer.cluster.backends.get(bid)
        if backend is None:
            raise AdminError(404, f"unknown backend {bid!r}")
        return backend

    # views ----------------------------------------------------------------------------
    def snapshot(self, events: int = EVENTS_IN_STATE) -> dict[str, Any]:
        bal = self.balancer
        cluster = bal.cluster
        cluster.eligible(bal.clock())  # refresh the cluster mode even without traffic
        listener: dict[str, Any] = {"configured": bal.cfg.listen, "bound": None}
        if bal.listening and bal.servers:
            host, port = bal.address
            listener["bound"] = f"{host}:{port}"
        listener["tls"] = bal.tls_store is not None
        stats = bal.ctx.stats
        tail = list(bal.events)[-events:] if events else []
        return {
            "algorithm": cluster.algorithm,
            "algorithms": list(ALGORITHMS),
            "mode": cluster.mode,
            "role": bal.role,
            "role_detail": bal.role_detail,
            "listener": listener,
            "uptime_s": round(time.time() - bal.started_at, 3),
            "now": time.time(),
            "stats": {name: getattr(stats, name) for name in type(stats).__slots__},
            "backends": bal.backend_view(),
            "latency_bounds": list(LATENCY_BUCKETS),
            "certificates": bal.tls_store.cert_info() if bal.tls_store is not None else [],
            "events": [e.as_dict() for e in reversed(tail)],  # newest first
        }

    # handlers -------------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def dashboard(self, request: web.Request) -> web.StreamResponse:
        resp = web.FileResponse(STATIC_DIR / "index.html")
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["Cache-Control"] = "no-cache"
        return resp

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = STATIC_DIR / name
        # one flat directory: refuse anything that is not a plain file name in it
        if "/" in name or name.startswith(".") or not path.is_file():
            raise AdminError(404, "not found")
        resp = web.FileResponse(path)
        resp.headers["Cache-Control"] = "no-cache"
        return resp

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=render(self.registry),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def state(self, request: web.Request) -> web.Response:
        return web.Response(text=_json(self.snapshot()), content_type="application/json")

    async def backend_action(self, request: web.Request) -> web.Response:
        self._authorize(request)
        backend = self._backend(request)
        action = request.match_info["action"]
        admin_state = {"drain": "draining", "enable": "enabled", "maint": "maint"}[action]
        previous = backend.admin_state
        backend.admin_state = admin_state
        self.balancer.cluster.invalidate()
        self.balancer.emit(action, backend.id, f"by admin ({previous} -> {admin_state})")
        return web.json_response(
            {"id": backend.id, "admin_state": admin_state, "state": self._state_of(backend)}
        )

    async def backend_weight(self, request: web.Request) -> web.Response:
        self._authorize(request)
        backend = self._backend(request)
        weight = parse_weight(await self._body(request))
        previous = backend.configured_weight
        backend.set_weight(weight)
        self.balancer.cluster.invalidate()
        self.balancer.emit("weight", backend.id, f"by admin ({previous:g} -> {weight:g})")
        return web.json_response({"id": backend.id, "weight": weight})

    async def algorithm(self, request: web.Request) -> web.Response:
        self._authorize(request)
        name = parse_algorithm(await self._body(request))
        if name != self.balancer.cluster.algorithm:
            self.balancer.set_algorithm(name)
        return web.json_response({"algorithm": name})

    async def reload(self, request: web.Request) -> web.Response:
        self._authorize(request)
        if self.balancer.load_config is None:
            raise AdminError(501, "reload is not available (no configuration source)")
        result: ReloadResult = self.balancer.reload()
        body = result.as_dict()
        if result.refused is not None:
            # 422: the request was fine, the configuration it asked to load is not
            body["error"] = f"reload refused: {result.refused}"
            return web.json_response(body, status=422)
        return web.json_response(body)

    def _state_of(self, backend: Any) -> str:
        state: str = self.balancer.cluster.state_of(backend)
        return state

    # SSE --------------------------------------------------------------------------------
    def _on_event(self, event: Any) -> None:
        if not self.clients:
            return
        data = _json(event.as_dict(), compact=True)
        for client in list(self.clients):
            client.offer("event", data)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(STATE_INTERVAL)
            if not self.clients:
                continue
            try:
                data = _json(self.snapshot(), compact=True)
            except Exception:  # keep ticking: one bad snapshot must not end the stream
                log.exception("admin state snapshot failed")
                continue
            for client in list(self.clients):
                client.offer("state", data)

    async def events(self, request: web.Request) -> web.StreamResponse:
        if len(self.clients) >= SSE_MAX_CLIENTS:
            raise AdminError(503, "too many event stream clients")
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        transport = request.transport
        client = SSEClient(transport.abort if transport is not None else None)
        self.clients.add(client)
        try:
            await resp.write(_sse("state", _json(self.snapshot(), compact=True)))
            while True:
                item = await client.queue.get()
                if item is None:
                    break
                await resp.write(_sse(*item))
        except ConnectionError:
            pass  # the client went away
        finally:
            self.clients.discard(client)
        return resp


def _sse(kind: str, data: str) -> bytes:
    return f"event: {kind}\ndata: {data}\n\n".encode()
