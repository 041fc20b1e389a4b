"""The Balancer: wires config, cluster, listeners, checks, discovery, admin and the pair role."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from balancer.config import BackendSpec, Config, split_hostport
from balancer.io.checks import ActiveChecks
from balancer.io.proxy import (
    ClientConnection,
    ProxyContext,
    Sweeper,
    access_log_sink,
    rescue_in_flight,
)
from balancer.lb.cluster import Backend, Cluster

log = logging.getLogger("balancer")
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST


def _reset(conn: ClientConnection) -> None:
    """Cut a client connection with a RST. `transport.abort()` alone drops the write buffer
    but still ends with a FIN, and after a FIN a truncated close-delimited body looks
    complete to the client."""
    t = conn.transport
    sock = t.get_extra_info("socket") if t is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    conn._abort()


# Settings a reload cannot change in a running process (sockets, contexts and check tasks
# are built from them at start). The admin token file and client CA are re-read per request.
RESTART_ONLY = ("listen", "tls", "pair", "health", "outlier", "slow_start")
RESTART_ONLY_ADMIN = ("listen", "cert", "key")


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """Names of the settings that differ between `old` and `new` but need a restart."""
    names = [n for n in RESTART_ONLY if getattr(old, n) != getattr(new, n)]
    names += [
        f"admin.{n}" for n in RESTART_ONLY_ADMIN if getattr(old.admin, n) != getattr(new.admin, n)
    ]
    return names


@dataclass(frozen=True)
class Event:
    ts: float
    kind: str
    backend: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"ts": self.ts, "kind": self.kind, "backend": self.backend, "detail": self.detail}


class RedirectProtocol(asyncio.Protocol):
    """A plain-HTTP listener that sends everyone to HTTPS with 308."""

    def __init__(self, https_port: int) -> None:
        self.port = https_port
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" not in self.buf:
            if len(self.buf) > 16384:
                self._reply(b"HTTP/1.1 431 Request Header Fields Too Large\r\n", b"")
            return
        head = self.buf.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        parts = head[0].split(b" ")
        target = parts[1] if len(parts) == 3 and parts[1].startswith(b"/") else b"/"
        host = b""
        for line in head[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"host":
                host = value.strip().rsplit(b":", 1)[0] if b"]" not in value else value.strip()
        if not host or any(c in host for c in b" \t\r\n/\\@"):
            self._reply(b"HTTP/1.1 400 Bad Request\r\n", b"400 Bad Request: missing Host\n")
            return
        port = b"" if self.port == 443 else b":%d" % self.port
        location = b"https://" + host + port + target
        self._reply(b"HTTP/1.1 308 Permanent Redirect\r\nLocation: " + location + b"\r\n", b"")

    def _reply(self, status_and_headers: bytes, body: bytes) -> None:
        assert self.transport is not None
        self.transport.write(
            status_and_headers
            + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
            + body
        )
        self.transport.close()


class Balancer:
    """One balancer process. `start()` brings everything up, `stop()` drains and resigns."""

    def __init__(self, cfg: Config, *, clock: Callable[[], float] | None = None) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.clock = clock or self.loop.time
        self.started_at = time.time()
        self.events: deque[Event] = deque(maxlen=500)
        self.event_listeners: list[Callable[[Event], None]] = []
        self.cluster = Cluster(
            cfg.backends,
            cfg.algorithm,
            cfg.hash_key,
            clock=self.clock,
            rng=random.Random(),
            outlier=cfg.outlier,
            retries=cfg.retries,
            slow_start=cfg.slow_start,
        )
        self.cluster.on_event = self.emit
        self.tls_store: Any = None
        self.upstream_ssl: ssl.SSLContext | None = None
        if cfg.tls.certs:
            from balancer.tls.store import CertStore

            self.tls_store = CertStore(
                [(c, k) for c, k in cfg.tls.certs],
                client_ca=cfg.tls.client_ca,
            )
        if cfg.tls.backend_ca:
            from pathlib import Path

            from balancer.tls.store import client_context

            self.upstream_ssl = client_context(
                Path(cfg.tls.backend_ca),
                Path(cfg.tls.backend_cert) if cfg.tls.backend_cert else None,
                Path(cfg.tls.backend_key) if cfg.tls.backend_key else None,
            )
        proto = b"https" if self.tls_store is not None else b"http"
        self.ctx = ProxyContext(
            cfg,
            self.cluster,
            proto=proto,
            upstream_ssl=self.upstream_ssl,
            upstream_server_name=cfg.tls.backend_server_name,
            access_log=access_log_sink(cfg.access_log),
        )
        self.sweeper = Sweeper([self.ctx], self.cluster)
        self.checks: ActiveChecks | None = None
        if cfg.health.enabled:
            self.checks = ActiveChecks(
                self.cluster,
                cfg.health,
                self.emit,
                self.upstream_ssl,
                cfg.tls.backend_server_name,
                on_down=self._rescue,
            )
        self.servers: list[asyncio.Server] = []
        self.listening = False
        self.role = "standalone"
        self.role_detail: dict[str, Any] = {}
        self.tasks: list[asyncio.Task[Any]] = []
        self.admin: Any = None
        self.pair: Any = None
        self.stopping = False

    def _rescue(self, backend: Backend) -> None:
        moved = rescue_in_flight(self.ctx, backend)
        if moved:
            self.emit("rescued", backend.id, f"{moved} in-flight request(s) moved off it")

    # events --------------------------------------------------------------------------
    def emit(self, kind: str, backend: str, detail: str) -> None:
        event = Event(time.time(), kind, backend, detail)
        self.events.append(event)
        for listener in list(self.event_listeners):
            listener(event)

    # life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self.sweeper.start()
        if self.checks is not None:
            self.checks.sync()
        if self.cfg.discover:
            self.tasks.append(self.loop.create_task(self._discover_loop()))
        if self.tls_store is not None:
            from balancer.tls.store import watch

            self.tasks.append(self.loop.create_task(watch(self.tls_store)))
        if self.cfg.admin.listen:
            from balancer.admin.api import AdminServer

            self.admin = AdminServer(self)
            await self.admin.start()
        if self.cfg.pair.peer:
            from balancer.pair.role import PairRole

            self.pair = PairRole(self)
            await self.pair.start()
        else:
            await self.start_listening()

    async def start_listening(self) -> None:
        """Bind the public listener(s). In a pair only the active calls this."""
        if self.listening:
            return
        host, port = split_hostport(self.cfg.listen, "listen")
        ctx = self.ctx
        loop = self.loop
        srv = await loop.create_server(
            lambda: ClientConnection(ctx, loop),
            host,
            port,
            ssl=self.tls_store.context if self.tls_store is not None else None,
            ssl_handshake_timeout=5.0 if self.tls_store is not None else None,
            reuse_address=True,
            backlog=2048,
        )
        self.servers.append(srv)
        if self.cfg.tls.redirect_http:
            rhost, rport = split_hostport(self.cfg.tls.redirect_http, "redirect-http")
            https_port = srv.sockets[0].getsockname()[1]
            self.servers.append(
                await loop.create_server(lambda: RedirectProtocol(https_port), rhost, rport)
            )
        self.listening = True

    async def stop_listening(self) -> None:
        """Unbind the public listener(s); established connections keep being served."""
        servers, self.servers = self.servers, []
        for srv in servers:
            # not wait_closed(): on 3.12+ it also waits for every client connection
            srv.close()
        self.listening = False

    @property
    def address(self) -> tuple[str, int]:
        """Where the public listener is bound (useful with port 0)."""
        sock = self.servers[0].sockets[0]
        name = sock.getsockname()
        return name[0], name[1]

    async def stop(self) -> None:
        """SIGTERM: stop accepting, finish in-flight requests, resign, exit.

        Within `shutdown_grace` of the call, in-flight exchanges finish and every client
        connection delivers what is queued for it, then closes. An exchange has "finished"
        once its last byte is handed to the client transport; a slow reader has not taken it
        yet, and `transport.close()` only starts a graceful close that sends the write buffer
        while the loop runs. So stop() waits for each client connection to be really closed
        (its `connection_lost`, which takes it out of `ctx.clients`): returning earlier let
        the process exit with the tail of the response unsent, a clean EOF hundreds of KB short.
        """
        if self.stopping:
            return
        self.stopping = True
        self.emit("shutdown", "", "stopping: draining in-flight requests")
        if self.pair is not None:
            await self.pair.stop()
        await self.stop_listening()
        ctx = self.ctx
        ctx.draining = True
        deadline = self.loop.time() + self.cfg.timeouts.shutdown_grace
        while self.loop.time() < deadline and any(
            c.current is not None or c.tunnel is not None for c in ctx.clients
        ):
            await asyncio.sleep(0.05)
        closing: list[ClientConnection] = []
        for conn in list(ctx.clients):
            ex = conn.current
            if ex is not None and ex.response_started:
                _reset(conn)  # cut off by the grace
            else:
                conn._close()  # flushes what the Sender batch holds, then a graceful close
                closing.append(conn)
        await self._wait_closed(closing, deadline)
        if self.checks is not None:
            await self.checks.stop()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.sweeper.stop()
        if self.admin is not None:
            await self.admin.stop()
        for backend in self.cluster.backends.values():
            while backend.idle:
                backend.idle.pop().close()

    async def _wait_closed(self, closing: list[ClientConnection], deadline: float) -> None:
        """Keep the loop running until these client connections have closed, i.e. flushed
        their write buffers to the kernel (bounded by `deadline`); reset what is left then."""
        clients = self.ctx.clients
        while self.loop.time() < deadline and any(c in clients for c in closing):
            await asyncio.sleep(0.01)
        left = [c for c in closing if c in clients]
        if left:
            unsent = sum(c.transport.get_write_buffer_size() for c in left if c.transport)
            log.warning(
                "shutdown grace over: %d client connection(s) still had %d byte(s) unsent",
                len(left),
                unsent,
            )
            for conn in left:
                _reset(conn)

    # runtime changes -------------------------------------------------------------------
    def set_algorithm(self, algorithm: str) -> None:
        self.cluster.set_algorithm(algorithm)
        self.emit("algorithm", "", algorithm)

    def apply(self, cfg: Config) -> None:
        """Reload: backends, algorithm, weights, timeouts. Certificates reload via the store."""
        # say so rather than pretend a changed value took effect
        fixed = restart_only_changes(self.cfg, cfg)
        if fixed:
            log.warning("reload: %s changed; takes effect after a restart", ", ".join(fixed))
        cluster = self.cluster
        wanted = {b.id: b for b in cfg.backends}
        for bid, backend in list(cluster.backends.items()):
            if backend.discovered:
                continue
            if bid not in wanted:
                self.drain_and_remove(bid)
        for bid, spec in wanted.items():
            existing = cluster.backends.get(bid)
            if existing is None:
                cluster.add(spec)
                self.emit("added", bid, "by reload")
            else:
                existing.set_weight(spec.weight)
                existing.backup = spec.backup
        if cfg.algorithm != cluster.algorithm:
            self.set_algorithm(cfg.algorithm)
        cluster.hash_key = cfg.hash_key
        self.ctx.reconfigure(cfg)
        self.cfg = cfg
        cluster.invalidate()
        if self.checks is not None:
            self.checks.sync()
        if self.tls_store is not None:
            self.tls_store.reload()
        detail = "configuration applied"
        if fixed:
            detail += f"; restart needed for: {', '.join(fixed)}"
        self.emit("reload", "", detail)

    def drain_and_remove(self, bid: str) -> None:
        backend = self.cluster.backends.get(bid)
        if backend is None:
            return
        backend.admin_state = "draining"
        self.cluster.invalidate()
        self.emit("draining", bid, "removed")

        async def finish() -> None:
            for _ in range(int(self.cfg.timeouts.shutdown_grace / 0.1) + 1):
                if backend.in_flight == 0:
                    break
                await asyncio.sleep(0.1)
            self.cluster.remove(bid)
            if self.checks is not None:
                self.checks.sync()
            self.emit("removed", bid, "drained")

        self.tasks.append(self.loop.create_task(finish()))

    async def _discover_loop(self) -> None:
        """Re-resolve DNS names; new addresses join, gone ones are drained."""
        first = True
        while True:
            seen: set[str] = set()
            for spec in self.cfg.discover:
                host, port = split_hostport(spec, "discover")
                try:
                    infos = await self.loop.getaddrinfo(
                        host, port, type=socket.SOCK_STREAM, family=socket.AF_INET
                    )
                except (OSError, UnicodeError) as exc:
                    if first:
                        self.emit("discovery", "", f"{host}: no servers yet ({exc})")
                    continue
                for info in infos:
                    addr = str(info[4][0])
                    seen.add(f"{addr}:{port}")
                    if f"{addr}:{port}" not in self.cluster.backends:
                        self.cluster.add(BackendSpec(addr, port), discovered=True)
                        self.emit("added", f"{addr}:{port}", f"discovered via {host}")
            for bid, backend in list(self.cluster.backends.items()):
                if backend.discovered and bid not in seen and backend.admin_state != "draining":
                    self.drain_and_remove(bid)
            if self.checks is not None:
                self.checks.sync()
            first = False
            await asyncio.sleep(self.cfg.discover_interval)

    # views ---------------------------------------------------------------------------
    def backend_view(self) -> list[dict[str, Any]]:
        cluster = self.cluster
        out = []
        for b in cluster.backends.values():
            out.append(
                {
                    "id": b.id,
                    "address": f"{b.host}:{b.port}",
                    "state": cluster.state_of(b),
                    "admin_state": b.admin_state,
                    "backup": b.backup,
                    "weight": b.configured_weight,
                    "effective_weight": round(b.weight, 3),
                    "in_flight": b.in_flight,
                    "connections": b.conn_count,
                    "idle_connections": len(b.idle),
                    "requests": b.requests,
                    "responses": {f"{i}xx": n for i, n in enumerate(b.responses) if i},
                    "errors": {"connect": b.errors_connect, "response": b.errors_response},
                    "retries": b.retries,
                    "ejections": b.ejections,
                    "last_check": {
                        "ok": b.last_check,
                        "detail": b.check_detail,
                        "duration_ms": round(b.check_duration * 1000, 2),
                    },
                    "latency_buckets": list(b.latency),
                    "discovered": b.discovered,
                }
            )
        return out
