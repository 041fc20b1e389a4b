"""The Balancer: wires config, cluster, listeners, checks, discovery, admin and the pair role."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from balancer.admin.views import backend_rows, budget_row, listener_rows
from balancer.config import (
    ALGORITHMS,
    Config,
    ConfigError,
    ReloadResult,
    diff,
    in_effect,
    split_hostport,
)
from balancer.events import Event, EventKind
from balancer.http1.client import rescue_in_flight
from balancer.http1.exchange import ClientPort, ListenerContext, ListenerStats, Pool, attach
from balancer.http1.pool import ConnectionPool
from balancer.io.backend import Connector
from balancer.io.checks import ActiveChecks
from balancer.io.discovery import Discovery
from balancer.io.lab import Lab, save_syn
from balancer.io.listener import RedirectProtocol, access_log_sink
from balancer.io.listeners import Server, bind_listeners
from balancer.io.sweeper import Sweeper
from balancer.io.tcp import open_backend
from balancer.io.transport import loop_batch
from balancer.lb.cluster import LATENCY_BUCKETS, Backend, Cluster
from balancer.tcp.relay import TcpContext

if TYPE_CHECKING:
    from balancer.admin.api import AdminServer, AdminState
    from balancer.pair.role import BalancerRole, PairRole
    from balancer.workers.supervisor import WorkerPool

log = logging.getLogger("balancer")


# the event each admin state is announced with; a removal announces "draining" itself
STATE_EVENTS: dict[str, EventKind] = {
    "enabled": EventKind.ENABLE,
    "draining": EventKind.DRAIN,
    "maint": EventKind.MAINT,
}


class Balancer:
    """One balancer process. `start()` brings everything up, `stop()` drains and resigns.

    The pair and the admin API see it only through the small Protocols they declare
    (balancer.pair.role.PairHost, balancer.admin.api.AdminHost); neither imports this module.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        clock: Callable[[], float] | None = None,
        load_config: Callable[[], Config] | None = None,
    ) -> None:
        self.cfg = cfg
        # re-reads the configuration source for `reload()`; None: nothing to reload from
        self.load_config = load_config
        self.loop = asyncio.get_running_loop()
        self.clock = clock or self.loop.time
        self.started_at = time.time()
        self.events: deque[Event] = deque(maxlen=500)
        self.event_listeners: list[Callable[[Event], None]] = []
        self.cluster = Cluster(
            cfg.backends,
            cfg.algorithm,
            clock=self.clock,
            rng=random.Random(),
            outlier=cfg.outlier,
            retries=cfg.retries,
            slow_start=cfg.slow_start,
        )
        self.cluster.on_event = self.emit
        self.tls_store: Any = None
        # one certificate store per ALPN offer (h2 or not) among the HTTP listeners
        self.tls_stores: dict[bool, Any] = {}
        self.backend_ssl: ssl.SSLContext | None = None
        if cfg.tls.certs:
            from balancer.tls.store import CertStore

            offers = [lst.http2 for lst in cfg.listeners if lst.mode == "http"] or [cfg.http2]
            for h2 in dict.fromkeys(offers):
                self.tls_stores[h2] = CertStore(
                    [(c, k) for c, k in cfg.tls.certs],
                    client_ca=cfg.tls.client_ca,
                    alpn=("h2", "http/1.1") if h2 else ("http/1.1",),
                )
            self.tls_store = next(iter(self.tls_stores.values()))  # certificates and the API
        if cfg.tls.backend_ca:
            from pathlib import Path

            from balancer.tls.store import client_context

            self.backend_ssl = client_context(
                Path(cfg.tls.backend_ca),
                Path(cfg.tls.backend_cert) if cfg.tls.backend_cert else None,
                Path(cfg.tls.backend_key) if cfg.tls.backend_key else None,
            )
        proto = b"https" if self.tls_store is not None else b"http"
        self.connector = Connector(self.backend_ssl, cfg.tls.backend_server_name)
        self.pool: Pool = ConnectionPool(
            cfg.limits, cfg.timeouts, self.clock, self.connector.open, attach
        )
        batch = loop_batch(self.loop)
        self.access_log = access_log_sink(cfg.access_log)
        self.ctx = ListenerContext(
            cfg,
            self.cluster,
            self.pool,
            clock=self.clock,
            batch=batch,
            proto=proto,
            access_log=self.access_log,
        )
        # one context per TCP-mode listener (each has its own accept_proxy)
        self.tcp = [
            TcpContext(
                cfg,
                lst,
                self.cluster,
                clock=self.clock,
                open=open_backend,
                access_log=self.access_log,
            )
            for lst in cfg.listeners
            if lst.mode == "tcp"
        ]
        for tctx in self.tcp:
            tctx.conns = self.ctx.conns  # one connection table for the network lab
        self.sweeper = Sweeper([self.ctx, *self.tcp], self.cluster, self.pool)
        self.lab = Lab(
            self.ctx.conns,
            self._lab_ports,
            lambda: {(b.host, b.port) for b in self.cluster.backends.values()},
        )
        self.checks: ActiveChecks | None = None
        if cfg.health_check.enabled:
            self.checks = ActiveChecks(
                self.cluster,
                cfg.health_check,
                self.emit,
                self.backend_ssl,
                cfg.tls.backend_server_name,
                on_down=self._rescue,
                proxy_of=self._proxy_of,
            )
        self.discovery = Discovery(
            self.cluster, lambda: self.cfg, self.emit, self.drain_and_remove, self._sync_checks
        )
        self.servers: list[Server] = []
        self.listening = False
        self.role: BalancerRole = "passive" if cfg.pair.peer else "standalone"
        self.tasks: list[asyncio.Task[Any]] = []
        self.admin: AdminServer | None = None
        self.pair: PairRole | None = None
        self.stopping = False
        # --workers N > 1: this is the supervisor and `workers` runs the data path; a
        # worker process's Balancer is a `follower` (its cluster follows the supervisor's)
        self.workers: WorkerPool | None = None
        self.follower = False

    def _sync_checks(self) -> None:
        if self.checks is not None:
            self.checks.sync()

    def _proxy_of(self, backend_id: str) -> str | None:
        """The PROXY version a TCP listener sends this backend (its checks send one too)."""
        if not self.tcp:
            return None
        return self.tcp[0].proxy_of.get(backend_id, self.cfg.proxy_protocol)

    def _rescue(self, backend: Backend) -> None:
        moved = rescue_in_flight(self.ctx, backend)
        if moved:
            self.emit(EventKind.RESCUED, backend.id, f"{moved} in-flight request(s) moved off it")

    # events --------------------------------------------------------------------------
    def emit(self, kind: EventKind, backend: str, detail: str) -> None:
        event = Event(time.time(), kind, backend, detail)
        self.events.append(event)
        for listener in list(self.event_listeners):
            listener(event)

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        self.event_listeners.append(listener)

    def unsubscribe(self, listener: Callable[[Event], None]) -> None:
        if listener in self.event_listeners:
            self.event_listeners.remove(listener)

    # life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        for bid in self.cluster.backends:  # start-up shows on the timeline as any later change
            self.emit(EventKind.ADDED, bid, "configured")
        self.sweeper.start()
        if self.checks is not None:
            self.checks.sync()
        if self.cfg.discover:
            self.tasks.append(self.loop.create_task(self.discovery.run()))
        if self.workers is not None:
            await self.workers.start()  # the workers watch nothing: certificates here too
        elif self.tls_stores:
            from balancer.tls.store import watch

            for store in self.tls_stores.values():
                self.tasks.append(self.loop.create_task(watch(store)))
        if self.cfg.admin.listen:
            from balancer.admin.api import AdminServer

            self.admin = AdminServer(self)
            await self.admin.start()
        if self.cfg.pair.peer:
            from balancer.pair.role import PairRole

            self.pair = PairRole(self.cfg.pair, self)
            await self.pair.start()
        else:
            await self.start_listening()

    async def start_listening(self, socks: list[socket.socket] | None = None) -> None:
        """Bind the public listener(s). In a pair only the active calls this. A worker
        process is handed its listening `socks`; a supervisor hands them out."""
        if self.listening:
            return
        loop = self.loop
        if self.workers is not None:
            self.workers.listen()
        else:
            stores = self.tls_stores
            tls_for = (lambda h2: stores[h2].context) if stores else None
            self.servers = await bind_listeners(self.cfg, self.ctx, self.tcp, tls_for, socks)
            for srv in self.servers:
                save_syn(srv.sockets)  # the network lab shows each connection's SYN options
        if self.follower:
            self.listening = True
            return  # the supervisor serves the redirect listener
        https_port = next((p for scheme, _, p in self.bound() if scheme != "tcp"), 0)
        if self.cfg.tls.redirect_http:
            rhost, rport = split_hostport(self.cfg.tls.redirect_http, "redirect-http")
            self.servers.append(
                await loop.create_server(lambda: RedirectProtocol(https_port), rhost, rport)
            )
        self.listening = True

    async def stop_listening(self) -> None:
        """Unbind the public listener(s); established connections keep being served."""
        servers, self.servers = self.servers, []
        if self.workers is not None:
            self.workers.unlisten()
        for srv in servers:
            # not wait_closed(): on 3.12+ it also waits for every client connection
            srv.close()
        self.listening = False

    def _lab_ports(self) -> set[int]:
        """The listeners' ports (a supervisor's listening sockets are the workers')."""
        ports = {s.getsockname()[1] for srv in self.servers for s in srv.sockets}
        if self.workers is not None:
            ports |= {port for _, port in self.workers.bound()}
        return ports

    @property
    def address(self) -> tuple[str, int]:
        """Where the public listener is bound (useful with port 0)."""
        if self.workers is not None:
            return self.workers.bound()[0]
        sock = self.servers[0].sockets[0]
        name = sock.getsockname()
        return name[0], name[1]

    def bound(self) -> list[tuple[str, str, int]]:
        """(scheme, host, port) of each public listener, in configuration order: `tcp` for
        TCP mode, else `http` or `https`."""
        http = "https" if self.tls_store is not None else "http"
        out = []
        names = (
            self.workers.bound()
            if self.workers is not None
            else [srv.sockets[0].getsockname() for srv in self.servers]
        )
        for lst, name in zip(self.cfg.listeners, names, strict=False):
            out.append(("tcp" if lst.mode == "tcp" else http, name[0], name[1]))
        return out

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
        self.emit(EventKind.SHUTDOWN, "", "stopping: draining in-flight requests")
        if self.pair is not None:
            await self.pair.stop()
        await self.stop_listening()
        if self.workers is not None:  # they drain as below, each in its own process
            await self.workers.stop(self.cfg.timeouts.shutdown_grace)
        ctx = self.ctx
        ctx.draining = True
        for tctx in self.tcp:
            tctx.draining = True
        deadline = self.loop.time() + self.cfg.timeouts.shutdown_grace
        while self.loop.time() < deadline and (
            any(c.current is not None or c.tunnel is not None for c in ctx.clients)
            or any(t.relays for t in self.tcp)
        ):
            await asyncio.sleep(0.05)
        for tctx in self.tcp:  # relayed connections still open at the end of the grace
            for relay in list(tctx.relays):
                relay.shutdown()
        closing: list[ClientPort] = []
        for conn in list(ctx.clients):
            ex = conn.current
            if ex is not None and ex.response_started:
                conn._abort()  # cut off by the grace: a RST, not a FIN
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
        self.pool.close_idle()

    # the pair's view (PairHost) -------------------------------------------------------
    def healthy_backends(self) -> int:
        # eligible() first: it refreshes cluster.mode, which a passive (no traffic) never does
        eligible = len(self.cluster.eligible(self.clock()))
        return eligible if self.cluster.mode == "normal" else 0

    def report_role(self, role: BalancerRole, reason: str) -> None:
        old, self.role = self.role, role
        self.emit(EventKind.ROLE, "", f"{old} -> {role}: {reason}")

    @property
    def role_detail(self) -> dict[str, Any]:
        """The pair's status as of now (peer ages computed when asked); {} when standalone."""
        return self.pair.status() if self.pair is not None else {}

    async def _wait_closed(self, closing: list[ClientPort], deadline: float) -> None:
        """Keep the loop running until these client connections have closed, i.e. flushed
        their write buffers to the kernel (bounded by `deadline`); reset what is left then."""
        clients = self.ctx.clients
        while self.loop.time() < deadline and any(c in clients for c in closing):
            await asyncio.sleep(0.01)
        left = [c for c in closing if c in clients]
        if left:
            unsent = sum(c.unsent() for c in left)
            log.warning(
                "shutdown grace over: %d client connection(s) still had %d byte(s) unsent",
                len(left),
                unsent,
            )
            for conn in left:
                conn._abort()

    # runtime changes -------------------------------------------------------------------
    def set_algorithm(self, algorithm: str) -> None:
        if algorithm == self.cluster.algorithm:
            return
        self.cluster.set_algorithm(algorithm)
        self.emit(EventKind.ALGORITHM, "", algorithm)

    def set_admin_state(
        self, backend_id: str, state: AdminState, reason: str, kind: EventKind | None = None
    ) -> str:
        """Every admin-state change goes through here: set it, re-derive eligibility, emit.

        Returns the backend's state afterwards; KeyError for an unknown backend.
        """
        backend = self.cluster.backends[backend_id]
        previous = backend.admin_state
        backend.admin_state = state
        self.cluster.invalidate()
        event = kind or STATE_EVENTS[state]
        self.emit(event, backend_id, f"{reason} ({previous} -> {state})")
        return self.cluster.state_of(backend)

    def set_weight(self, backend_id: str, weight: float, reason: str) -> None:
        """Change a backend's configured weight; KeyError for an unknown backend."""
        backend = self.cluster.backends[backend_id]
        previous = backend.configured_weight
        backend.set_weight(weight)
        self.cluster.invalidate()
        self.emit(EventKind.WEIGHT, backend_id, f"{reason} ({previous:g} -> {weight:g})")

    def reload(self) -> ReloadResult:
        """Re-read the configuration and apply it; a bad one is refused as a whole.

        The result is logged in one line and shown on the event timeline."""
        if self.load_config is None:
            raise RuntimeError("reload without a configuration source")
        try:
            cfg = self.load_config()
        except ConfigError as exc:
            result = ReloadResult(refused=str(exc))
            log.error("reload %s", result.summary())
            self.emit(EventKind.RELOAD_REFUSED, "", str(exc))
            return result
        return self.apply(cfg)

    def apply(self, cfg: Config) -> ReloadResult:
        """Apply every live setting of an already validated `cfg` now; report the others.

        Which settings are live comes from the schema (`live` field metadata)."""
        result = diff(self.cfg, cfg)
        cfg = in_effect(self.cfg, cfg)
        cluster = self.cluster
        # a worker's backends, weights and algorithm follow the supervisor's snapshots
        wanted = {} if self.follower else {b.id: b for b in cfg.backends}
        for bid, backend in list(cluster.backends.items()):
            if self.follower:
                break
            if backend.discovered:
                continue
            if bid not in wanted:
                self.drain_and_remove(bid)
        for bid, spec in wanted.items():
            existing = cluster.backends.get(bid)
            if existing is None:
                cluster.add(spec)
                self.emit(EventKind.ADDED, bid, "by reload")
            else:
                existing.set_weight(spec.weight)
                existing.backup = spec.backup
        if cfg.algorithm != cluster.algorithm and not self.follower:
            self.set_algorithm(cfg.algorithm)
        cluster.budget.configure(cfg.retries.budget_ratio, cfg.retries.budget_min_per_second)
        if cfg.access_log != self.cfg.access_log:
            old, self.access_log = self.access_log, access_log_sink(cfg.access_log)
            self.ctx.access_log = self.access_log
            for tctx in self.tcp:
                tctx.access_log = self.access_log
            if old is not None:
                old.close()
        if cfg.log_level != self.cfg.log_level:
            logging.getLogger().setLevel(cfg.log_level.upper())
        if cfg.discover and not self.cfg.discover and not self.follower:
            self.tasks.append(self.loop.create_task(self.discovery.run()))
        self.ctx.reconfigure(cfg)
        for tctx in self.tcp:
            tctx.reconfigure(cfg)
        self.pool.reconfigure(cfg.limits, cfg.timeouts)
        self.cfg = cfg
        cluster.invalidate()
        if self.checks is not None:
            self.checks.sync()
        for store in self.tls_stores.values():
            store.reload()
        if result.restart_needed:
            log.warning("reload: %s (takes effect after a restart)", result.summary())
        else:
            log.info("reload: %s", result.summary())
        self.emit(EventKind.RELOAD, "", result.summary())
        if self.workers is not None:
            self.workers.reload()
        return result

    def drain_and_remove(self, bid: str) -> None:
        backend = self.cluster.backends.get(bid)
        if backend is None:
            return
        self.set_admin_state(bid, "draining", "removed", EventKind.DRAINING)

        async def finish() -> None:
            for _ in range(int(self.cfg.timeouts.shutdown_grace / 0.1) + 1):
                if backend.in_flight == 0:
                    break
                await asyncio.sleep(0.1)
            self.cluster.remove(bid)
            self.pool.close_idle(bid)
            if self.checks is not None:
                self.checks.sync()
            self.emit(EventKind.REMOVED, bid, "drained")

        self.tasks.append(self.loop.create_task(finish()))

    # views (AdminHost, MetricsSource) --------------------------------------------------
    @property
    def stats(self) -> ListenerStats:
        return self.ctx.stats

    def state_view(self) -> dict[str, Any]:
        cluster = self.cluster
        cluster.eligible(self.clock())  # refresh the cluster mode even without traffic
        listener: dict[str, Any] = {"configured": self.cfg.listen, "bound": None}
        if self.listening and self.servers:
            host, port = self.address
            listener["bound"] = f"{host}:{port}"
        listener["tls"] = self.tls_store is not None
        # the first HTTP listener's (each listener's are in "all")
        first_http = next((lst for lst in self.cfg.listeners if lst.mode == "http"), None)
        h2 = first_http is not None and first_http.http2
        listener["protocols"] = ["HTTP/1.1", "HTTP/2"] if h2 else ["HTTP/1.1"]
        listener["all"] = listener_rows(
            self.cfg.listeners, self.bound() if self.listening else [], self.tcp
        )
        stats = self.stats
        return {
            "algorithm": cluster.algorithm,
            "algorithms": list(ALGORITHMS),
            "mode": cluster.mode,
            "role": self.role,
            "role_detail": self.role_detail,
            "listener": listener,
            "uptime_s": round(time.time() - self.started_at, 3),
            "now": time.time(),
            "stats": {name: getattr(stats, name) for name in type(stats).__slots__},
            "retry_budget": budget_row(cluster.budget),
            "backends": self.backend_view(),
            "latency_bounds": list(LATENCY_BUCKETS),
            "certificates": self.tls_store.cert_info() if self.tls_store is not None else [],
            "workers": self.worker_rows(),
        }

    def worker_rows(self) -> list[dict[str, Any]]:
        return self.workers.rows() if self.workers is not None else []

    def backend_view(self) -> list[dict[str, Any]]:
        return backend_rows(self.cluster, self.pool.counts)
