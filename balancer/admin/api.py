"""The admin listener (aiohttp): JSON API, live dashboard, Server-Sent Events and /metrics.

Reads are open (/api/state, /api/events, /api/history, /metrics). Mutations
(drain/enable/maint, weight, algorithm, reload) need one of:
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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from aiohttp import web

from balancer.admin.history import History, Sample
from balancer.admin.lab import LabView
from balancer.admin.lab import routes as lab_routes
from balancer.admin.metrics import MetricsSource, make_registry, render
from balancer.config import ALGORITHMS, Config, ReloadResult, split_hostport
from balancer.events import Event

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

AdminState = Literal["enabled", "draining", "maint"]
ACTIONS: dict[str, AdminState] = {"drain": "draining", "enable": "enabled", "maint": "maint"}


class AdminHost(MetricsSource, Protocol):
    """What the admin API needs from the balancer (balancer.app.Balancer is one)."""

    @property
    def cfg(self) -> Config: ...

    @property
    def events(self) -> Sequence[Event]:
        """The recent events, oldest first."""

    @property
    def load_config(self) -> Callable[[], Config] | None:
        """Re-reads the configuration source; None when there is none to reload from."""

    def reload(self) -> ReloadResult:
        """Re-read and apply the configuration; logs and emits the result."""

    def state_view(self) -> dict[str, Any]:
        """The balancer's state for /api/state, without the events."""

    def subscribe(self, listener: Callable[[Event], None]) -> None: ...

    def unsubscribe(self, listener: Callable[[Event], None]) -> None: ...

    def set_admin_state(self, backend_id: str, state: AdminState, reason: str) -> str:
        """Set it, re-derive eligibility, emit the event; returns the backend's state.

        KeyError for an unknown backend, as in set_weight.
        """

    def set_weight(self, backend_id: str, weight: float, reason: str) -> None:
        """Change a backend's configured weight and emit the event."""

    def set_algorithm(self, algorithm: str) -> None:
        """Switch the algorithm (no-op when unchanged)."""

    @property
    def lab(self) -> LabView:
        """The network lab: connections, their TCP and TLS facts, socket states."""


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


def _unknown_backend(bid: str) -> AdminError:
    return AdminError(404, f"unknown backend {bid!r}")


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
    """Runs the admin listener of one balancer."""

    def __init__(self, balancer: AdminHost) -> None:
        self.balancer = balancer
        self.registry = make_registry(balancer, balancer.lab.table)
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.clients: set[SSEClient] = set()
        self.ticker: asyncio.Task[None] | None = None
        self.history = History()
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
        r.add_get("/api/history", self.history_view)
        r.add_post("/api/backends/{id}/{action:drain|enable|maint}", self.backend_action)
        r.add_put("/api/backends/{id}/weight", self.backend_weight)
        r.add_put("/api/algorithm", self.algorithm)
        r.add_post("/api/reload", self.reload)
        r.add_get("/static/{name}", self.static)
        r.add_routes(lab_routes(self.balancer.lab, AdminError))
        return app

    async def start(self) -> None:
        listen = self.balancer.cfg.admin.listen
        assert listen is not None  # the balancer starts its admin server only when set
        host, port = split_hostport(listen, "admin")
        self.runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=self.ssl_context)
        await site.start()
        bound_host, bound_port = self.runner.addresses[0][:2]
        scheme = "https" if self.ssl_context is not None else "http"
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"{scheme}://{shown}:{bound_port}"
        self.balancer.subscribe(self._on_event)
        self.ticker = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> None:
        self.balancer.unsubscribe(self._on_event)
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

    def _backend_id(self, request: web.Request) -> str:
        """The backend's name; its address (shown beside the name) is accepted too."""
        bid = request.match_info["id"]
        backends = self.balancer.cluster.backends
        if bid in backends:
            return bid
        for name, backend in backends.items():
            if backend.address == bid:
                return name
        raise _unknown_backend(bid)

    # views ----------------------------------------------------------------------------
    def snapshot(self, events: int = EVENTS_IN_STATE) -> dict[str, Any]:
        bal = self.balancer
        state = bal.state_view()
        tail = list(bal.events)[-events:] if events else []
        state["events"] = [e.as_dict() for e in reversed(tail)]  # newest first
        return state

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

    async def history_view(self, request: web.Request) -> web.Response:
        """The last 10 minutes of the charts' series: a new page starts with them."""
        # ends with now, so the page joins the live stream seamlessly
        body = _json(self.history.as_dict(now=self._counters()), compact=True)
        return web.Response(text=body, content_type="application/json")

    async def backend_action(self, request: web.Request) -> web.Response:
        self._authorize(request)
        bid = self._backend_id(request)
        admin_state = ACTIONS[request.match_info["action"]]
        state = self.balancer.set_admin_state(bid, admin_state, "by admin")
        return web.json_response({"id": bid, "admin_state": admin_state, "state": state})

    async def backend_weight(self, request: web.Request) -> web.Response:
        self._authorize(request)
        bid = self._backend_id(request)
        weight = parse_weight(await self._body(request))
        try:
            self.balancer.set_weight(bid, weight, "by admin")
        except KeyError:  # removed while the body was read
            raise _unknown_backend(bid) from None
        return web.json_response({"id": bid, "weight": weight})

    async def algorithm(self, request: web.Request) -> web.Response:
        self._authorize(request)
        name = parse_algorithm(await self._body(request))
        self.balancer.set_algorithm(name)
        return web.json_response({"algorithm": name})

    async def reload(self, request: web.Request) -> web.Response:
        self._authorize(request)
        if self.balancer.load_config is None:
            raise AdminError(501, "reload is not available (no configuration source)")
        result = self.balancer.reload()
        body = result.as_dict()
        if result.refused is not None:
            # 422: the request was fine, the configuration it asked to load is not
            body["error"] = f"reload refused: {result.refused}"
            return web.json_response(body, status=422)
        return web.json_response(body)

    # SSE --------------------------------------------------------------------------------
    def _on_event(self, event: Event) -> None:
        if not self.clients:
            return
        data = _json(event.as_dict(), compact=True)
        for client in list(self.clients):
            client.offer("event", data)

    def _counters(self) -> Sample:
        backends = self.balancer.cluster.backends
        return Sample(time.time(), {bid: b.requests for bid, b in backends.items()})

    def record_history(self) -> None:
        sample = self._counters()
        self.history.record(sample.t, sample.requests)

    async def _tick(self) -> None:
        while True:
            self.record_history()  # kept with or without a page open
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
