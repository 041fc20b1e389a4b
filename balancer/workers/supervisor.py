"""The supervisor's side of the worker processes (driver).

With `--workers N` (N > 1) the process started is the supervisor: it keeps the checks,
discovery, the pair, the admin API, reload and certificate watching (the `Balancer` it
runs, minus the data path), and this `WorkerPool` owns the workers: spawns them, hands
them the listening sockets, pushes the cluster decisions to them, sums their counters,
restarts one that dies, and stops them all on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from balancer.config import Config, split_hostport
from balancer.events import Event, EventKind
from balancer.io.lab import Lab
from balancer.lab.merge import add_aggregates, owner, write_aggregates
from balancer.lb.cluster import Cluster
from balancer.workers.codec import Decoder, Message, encode
from balancer.workers.shared import MAX_SLOTS, InFlightTable
from balancer.workers.view import FORWARDED, add_into, snapshot, write_totals

log = logging.getLogger("balancer.workers")

# s: a safety net. A decision reaches every worker in one loop turn: each raises an event,
# which schedules a push, and the one change that raises none, an ejection expiring, has
# a timer of its own (an idle supervisor used to wake 20 times a second to compare)
PUSH_PERIOD = 1.0
RESTART_BACKOFF_MAX = 5.0  # s: between restarts of a worker that keeps dying at start
LAB_TIMEOUT = 2.0  # s: a worker that has not sent its connections by then is left out
WORKER_ENV = "LB_WORKER"  # index,ctl fd,fd-channel fd,table fd,workers,supervisor pid
# one socket per worker with SO_REUSEPORT (the default: the kernel spreads connections by
# a hash of the 4-tuple), or one listening socket per listener shared by all workers
# (LB_WORKERS_SHARED_SOCKET=1). Pinned to one CPU both spread the bench's load within 2 %;
# on separate CPUs SO_REUSEPORT stayed within 9-11 % where the shared socket was 25-100 %
# off (the worker that wakes first takes the connections). See docs/ARCHITECTURE.md.
REUSE_PORT = os.environ.get("LB_WORKERS_SHARED_SOCKET", "") != "1"


class Host(Protocol):
    """What the pool needs of the supervising Balancer."""

    cfg: Config
    cluster: Cluster
    tls_stores: dict[bool, Any]
    lab: Lab

    @property
    def stats(self) -> Any: ...

    def emit(self, kind: EventKind, backend: str, detail: str) -> None: ...

    def subscribe(self, listener: Callable[[Event], None]) -> None: ...


class Worker:
    """One worker process as the supervisor sees it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.popen: subprocess.Popen[bytes] | None = None
        self.transport: asyncio.Transport | None = None
        self.fds: socket.socket | None = None
        self.started = 0.0
        self.restarts = 0
        self.last: dict[str, Any] = {}  # its latest stats report
        self.lab: dict[str, Any] = {}  # its latest network lab aggregates
        self.alive = False

    def send(self, msg: Message) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode(msg))


class _Link(asyncio.Protocol):
    def __init__(self, pool: WorkerPool, worker: Worker) -> None:
        self.pool = pool
        self.worker = worker
        self.decoder = Decoder()

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
        except ValueError as exc:
            log.error("worker %d: bad message (%s); restarting it", self.worker.index, exc)
            self.pool.kill(self.worker)
            return
        for msg in messages:
            self.pool.on_message(self.worker, msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.on_exit(self.worker)


class WorkerPool:
    def __init__(self, host: Host, argv: list[str], count: int) -> None:
        self.host = host
        self.argv = argv
        self.loop = asyncio.get_running_loop()
        self.workers = [Worker(i) for i in range(count)]
        self.table = InFlightTable(count)
        self.slots: dict[str, int] = {}
        self.socks: list[list[socket.socket]] = []  # per listener: one, or one per worker
        self.retired: dict[str, Any] = {}  # counters of worker processes that exited
        self.retired_lab: dict[str, Any] = {}  # and their network lab aggregates
        self._lab_dirty = False
        self._asks: dict[tuple[int, int], asyncio.Future[Message]] = {}  # (req, worker)
        self._req = 0
        host.lab.remote = self  # the lab asks the workers for their connections
        self.stopping = False
        self.reloads = 0
        self.cert_reloads = 0
        self._pushed = b""
        self._push_soon = False
        self._expiry: asyncio.TimerHandle | None = None
        self.tasks: list[asyncio.Task[Any]] = []

    # life cycle ---------------------------------------------------------------------
    async def start(self) -> None:
        self.host.subscribe(self._on_event)
        for w in self.workers:
            await self._spawn(w)
        self.tasks.append(self.loop.create_task(self._push_loop()))
        if self.host.tls_stores:
            self.tasks.append(self.loop.create_task(self._watch_certs()))

    async def _spawn(self, w: Worker) -> None:
        ctl_parent, ctl_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fd_parent, fd_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.table.clear_row(w.index)
        spec = ",".join(
            str(x)
            for x in (
                w.index,
                ctl_child.fileno(),
                fd_child.fileno(),
                self.table.fd,
                len(self.workers),
                os.getpid(),
            )
        )
        env = dict(os.environ, **{WORKER_ENV: spec})
        try:
            w.popen = subprocess.Popen(
                [sys.executable, "-m", "balancer", *self.argv],
                pass_fds=(ctl_child.fileno(), fd_child.fileno(), self.table.fd),
                env=env,
            )
        finally:
            ctl_child.close()
            fd_child.close()
        w.fds = fd_parent
        w.started = time.monotonic()
        w.alive = True
        w.last = {}
        w.lab = {}
        transport, _ = await self.loop.create_unix_connection(
            lambda: _Link(self, w), sock=ctl_parent
        )
        w.transport = transport  # type: ignore[assignment]
        w.send(self._snapshot())
        if self.socks:
            self._send_listen(w)

    def on_exit(self, w: Worker) -> None:
        """Its control socket closed: the worker exited (or is about to). Reap, restart."""
        if not w.alive:
            return
        w.alive = False
        w.transport = None
        if w.fds is not None:
            w.fds.close()
            w.fds = None
        if w.last:
            last = dict(w.last, stats=dict(w.last.get("stats", {}), connections_open=0))
            add_into(self.retired, last)
            w.last = {}
        if w.lab:
            add_aggregates(self.retired_lab, dict(w.lab, open={}))
            w.lab = {}
            self._lab_dirty = True
        for (_, index), fut in self._asks.items():
            if index == w.index and not fut.done():
                fut.set_result({})  # no answer coming: the lab shows the others
        self.table.clear_row(w.index)
        if not self.stopping:
            self.tasks = [t for t in self.tasks if not t.done()]  # earlier restarts
            self.tasks.append(self.loop.create_task(self._restart(w)))

    async def _restart(self, w: Worker) -> None:
        code = await self._reap(w, 1.0)
        pid = w.popen.pid if w.popen is not None else 0
        lived = time.monotonic() - w.started
        delay = 0.0 if lived > 1.0 else min(RESTART_BACKOFF_MAX, 0.1 * 2 ** min(w.restarts, 6))
        w.restarts += 1
        self.host.emit(
            EventKind.WORKER, "", f"worker {w.index} (pid {pid}) exited ({code}); restarting"
        )
        log.warning("worker %d (pid %d) exited (%s); restarting", w.index, pid, code)
        if delay:
            await asyncio.sleep(delay)
        if not self.stopping:
            await self._spawn(w)
            pid = w.popen.pid if w.popen is not None else 0
            self.host.emit(EventKind.WORKER, "", f"worker {w.index} restarted as pid {pid}")

    async def _reap(self, w: Worker, timeout: float) -> str:
        """Wait (bounded) for the process to exit, SIGKILL it past `timeout`; its status."""
        if w.popen is None:
            return "never started"
        for _ in range(int(timeout / 0.02) + 1):
            code = w.popen.poll()
            if code is not None:
                return _describe(code)
            await asyncio.sleep(0.02)
        w.popen.kill()
        for _ in range(50):  # SIGKILL cannot be ignored; 1 s bound all the same
            code = w.popen.poll()
            if code is not None:
                return _describe(code) + " after SIGKILL"
            await asyncio.sleep(0.02)
        return "still running after SIGKILL"

    def kill(self, w: Worker) -> None:
        if w.popen is not None and w.popen.poll() is None:
            w.popen.kill()

    async def stop(self, grace: float) -> None:
        """SIGTERM of the supervisor: every worker drains within the grace, then exits."""
        self.stopping = True
        for w in self.workers:
            w.send({"type": "stop"})
        await asyncio.gather(*(self._reap(w, grace + 1.0) for w in self.workers))
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._expiry is not None:
            self._expiry.cancel()
        self.unlisten()
        self.table.close()

    # listeners ----------------------------------------------------------------------
    def listen(self) -> None:
        """Bind every public listener here (errors surface as at start) and hand the
        sockets to the workers; they accept, the supervisor never does."""
        if self.socks:
            return
        per_worker = len(self.workers) if REUSE_PORT else 1
        socks: list[list[socket.socket]] = []
        try:
            for lst in self.host.cfg.listeners:
                host, port = split_hostport(lst.listen, "listen")
                group: list[socket.socket] = []
                socks.append(group)
                for _ in range(per_worker):
                    s = socket.create_server(
                        (host, port),
                        family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                        backlog=2048,
                        reuse_port=REUSE_PORT,
                    )
                    group.append(s)
                    port = s.getsockname()[1]  # port 0: the others join the one it got
        except BaseException:
            for group in socks:
                for s in group:
                    s.close()
            raise
        self.socks = socks
        for w in self.workers:
            if w.alive:
                self._send_listen(w)

    def _send_listen(self, w: Worker) -> None:
        fds = [group[w.index % len(group)].fileno() for group in self.socks]
        if w.fds is None:
            return
        socket.send_fds(w.fds, [b"L"], fds)
        w.send({"type": "listen", "count": len(fds)})

    def unlisten(self) -> None:
        for w in self.workers:
            w.send({"type": "unlisten"})
        for group in self.socks:
            for s in group:
                s.close()
        self.socks = []

    def bound(self) -> list[tuple[str, int]]:
        out = []
        for group in self.socks:
            name = group[0].getsockname()
            out.append((str(name[0]), int(name[1])))
        return out

    # decisions out ------------------------------------------------------------------
    def _snapshot(self) -> Message:
        cluster = self.host.cluster
        for bid in cluster.backends:
            if bid not in self.slots and len(self.slots) < MAX_SLOTS:
                self.slots[bid] = len(self.slots)  # never reused: a slot is one backend
        return snapshot(cluster, cluster.clock(), self.slots)

    def _on_event(self, event: Event) -> None:
        if not self._push_soon:  # many events in one turn: one push after them
            self._push_soon = True
            self.loop.call_soon(self.push)

    def push(self) -> None:
        """Send the cluster decisions to every worker if they changed."""
        self._push_soon = False
        msg = encode(self._snapshot())  # expired ejections are forgotten here
        self._time_expiry()
        if msg == self._pushed:
            return
        self._pushed = msg
        for w in self.workers:
            if w.transport is not None and not w.transport.is_closing():
                w.transport.write(msg)

    def _time_expiry(self) -> None:
        """One push when the next ejection ends (slow start needs none: the workers ramp
        the weight up themselves from `up_since`)."""
        cluster = self.host.cluster
        ends = [cluster.outlier.ejected_until(bid) for bid in cluster.backends]
        end = min((e for e in ends if e is not None), default=None)
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if end is not None:
            delay = max(0.0, end - cluster.clock()) + 0.001  # a timer may fire early
            self._expiry = self.loop.call_later(delay, self.push)

    async def _push_loop(self) -> None:
        # a safety net for the pushes, and the counters of a worker that exited
        while True:
            await asyncio.sleep(PUSH_PERIOD)
            try:
                self.push()
                self._write_totals()
            except Exception:
                log.exception("worker push failed")

    def reload(self) -> None:
        self.reloads += 1
        self.push()  # the new membership first, so a worker's reload finds it
        for w in self.workers:
            w.send({"type": "reload", "generation": self.reloads})

    async def _watch_certs(self) -> None:
        stores = list(self.host.tls_stores.values())
        while True:
            await asyncio.sleep(1.0)
            try:
                # one store per ALPN variant, the same files: reload all, tell workers once
                if [s.maybe_reload() for s in stores].count(True):
                    self.cert_reloads += 1
                    for w in self.workers:
                        w.send({"type": "certs", "generation": self.cert_reloads})
            except Exception:
                log.exception("TLS certificate watcher error")

    # counters in --------------------------------------------------------------------
    def on_message(self, w: Worker, msg: Message) -> None:
        kind = msg["type"]
        cluster = self.host.cluster
        if kind == "stats":
            w.last = msg
            if "lab" in msg:  # sent when it changed
                w.lab = msg["lab"]
                self._lab_dirty = True
            self._write_totals()  # the views read them, so they are as fresh as the reports
        elif kind == "lab":
            w.lab = msg.get("lab", w.lab)
            self._lab_dirty = True
            fut = self._asks.get((msg.get("req", -1), w.index))
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif kind == "fail":
            backend = cluster.backends.get(str(msg.get("id")))
            if backend is not None:
                cluster.failure(backend, str(msg.get("kind")))
        elif kind == "ok":
            bid = str(msg.get("id"))
            if bid in cluster.backends:
                cluster.outlier.on_success(bid)
        elif kind == "event" and msg.get("kind") in FORWARDED:
            detail = f"worker {w.index}: {msg.get('detail', '')}"
            self.host.emit(EventKind(str(msg["kind"])), str(msg.get("backend", "")), detail)

    def _write_totals(self) -> None:
        total: dict[str, Any] = {}
        add_into(total, self.retired)
        for w in self.workers:
            if w.last:
                add_into(total, w.last)
        cluster = self.host.cluster
        write_totals(total, self.host.stats, cluster.backends, cluster.budget)
        if self._lab_dirty:
            self._write_lab()
        for bid, backend in self.host.cluster.backends.items():
            slot = self.slots.get(bid, -1)
            backend.in_flight = self.table.total(slot) if slot >= 0 else 0

    def _write_lab(self) -> None:
        self._lab_dirty = False
        total: dict[str, Any] = {}
        add_aggregates(total, self.retired_lab)
        for w in self.workers:
            add_aggregates(total, w.lab)
        write_aggregates(total, self.host.lab.table)

    # the network lab ----------------------------------------------------------------
    def pids(self) -> list[int]:
        return [w.popen.pid for w in self.workers if w.alive and w.popen is not None]

    async def ask_lab(self, msg: Message) -> list[Message]:
        """Send a lab request to the workers that hold the answer (all of them, or the
        owner of msg["id"]); their replies within LAB_TIMEOUT, aggregates applied."""
        targets = [w for w in self.workers if w.alive]
        if "id" in msg:
            index = owner(int(msg["id"]), len(self.workers))
            targets = [w for w in targets if w.index == index]
        self._req += 1
        keys = [(self._req, w.index) for w in targets]
        futs = [self.loop.create_future() for _ in targets]
        self._asks.update(zip(keys, futs, strict=True))
        try:
            for w in targets:
                w.send({**msg, "req": self._req})
            if futs:
                await asyncio.wait(futs, timeout=LAB_TIMEOUT)
        finally:
            for key in keys:
                self._asks.pop(key, None)
        if self._lab_dirty:
            self._write_lab()
        return [f.result() for f in futs if f.done() and f.result()]

    def rows(self) -> list[dict[str, Any]]:
        """The `workers` list of /api/state and /metrics."""
        out = []
        for w in self.workers:
            last = w.last
            out.append(
                {
                    "index": w.index,
                    "pid": w.popen.pid if w.popen is not None and w.alive else None,
                    "alive": w.alive,
                    "restarts": w.restarts,
                    "requests": last.get("stats", {}).get("requests_total", 0),
                    "connections_open": last.get("stats", {}).get("connections_open", 0),
                    "cpu_seconds": last.get("cpu_seconds", 0.0),
                    "rss_bytes": last.get("rss_bytes", 0),
                    "reloads": last.get("reloads", 0),
                    "cert_reloads": last.get("cert_reloads", 0),
                    "listening": last.get("listening", False),
                }
            )
        return out


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
