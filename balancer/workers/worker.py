"""One worker process (driver): the data path only, following its supervisor.

It runs a `Balancer` without checks, discovery, admin API or pair: its cluster takes the
supervisor's snapshots, its passive-check outcomes go to the supervisor, its in-flight
counts go to its row of the shared table, and it accepts on the sockets it is handed.
It exits when the supervisor says stop, and drains and exits when the supervisor dies
(control-socket EOF, or the parent-death signal).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import resource
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from balancer.config import Config
from balancer.events import Event
from balancer.http1.exchange import ListenerStats
from balancer.io.lab import Lab
from balancer.lab.merge import aggregates, id_scheme
from balancer.lab.table import ConnTable
from balancer.lb.cluster import Backend, Cluster
from balancer.workers.codec import Decoder, Message, encode
from balancer.workers.shared import (
    InFlightTable,
    SharedBackend,
    SharedRetryBudget,
    worker_algorithm,
)
from balancer.workers.view import FORWARDED, apply_snapshot, report

log = logging.getLogger("balancer.worker")

REPORT_PERIOD = 0.1  # s between stats reports to the supervisor (when they changed)
HEARTBEAT = 10  # reports: an unchanged one is sent once in this many periods
# records one lab answer carries at most: ~1 KB each keeps the frame well under the
# codec's 4 MiB (a frame over it would be a protocol error, and the worker would exit)
LAB_MAX_ROWS = 2000
PR_SET_PDEATHSIG = 1
PAGE = os.sysconf("SC_PAGE_SIZE")


def die_with_parent(sig: int) -> None:
    """Ask the kernel to send `sig` when the parent exits (Linux; a no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0


class Follower(Protocol):
    """What a worker drives of its Balancer (balancer.app.Balancer is one)."""

    cfg: Config
    cluster: Cluster
    checks: Any
    follower: bool
    tls_stores: dict[bool, Any]
    sweeper: Any
    lab: Lab

    @property
    def stats(self) -> ListenerStats: ...

    def _rescue(self, backend: Backend) -> None: ...

    def subscribe(self, listener: Callable[[Event], None]) -> None: ...

    def reload(self) -> Any: ...

    async def start_listening(self, socks: list[socket.socket] | None = None) -> None: ...

    async def stop_listening(self) -> None: ...

    async def stop(self) -> None: ...


class _Remote:
    """Cluster.remote: outcomes to the supervisor, ejections from its snapshots."""

    def __init__(self, send: Callable[[Message], None]) -> None:
        self.send = send
        self.ejected_ids: set[str] = set()

    def failure(self, backend_id: str, kind: str) -> None:
        self.send({"type": "fail", "id": backend_id, "kind": kind})

    def success(self, backend_id: str) -> None:
        self.send({"type": "ok", "id": backend_id})

    def ejected(self, backend_id: str) -> bool:
        return backend_id in self.ejected_ids


class _Control(asyncio.Protocol):
    def __init__(self, on_message: Callable[[Message], None], on_eof: Callable[[], None]) -> None:
        self.decoder = Decoder()
        self.on_message = on_message
        self.on_eof = on_eof

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
        except ValueError as exc:
            log.error("bad message from the supervisor (%s); exiting", exc)
            self.on_eof()
            return
        for msg in messages:
            self.on_message(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_eof()


async def serve_worker(
    make: Callable[[], Follower], cfg: Config, spec: str, on_ready: Callable[[], None]
) -> int:
    """Run one worker until told to stop; `make` builds its Balancer (only __main__
    imports the wiring), `on_ready` runs once it serves (GC tuning)."""
    index_s, ctl_fd, fd_fd, table_fd, count, parent = spec.split(",")
    index, workers = int(index_s), int(count)
    die_with_parent(signal.SIGUSR1)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    if os.getppid() != int(parent):  # the supervisor died before prctl took effect
        return 0
    table = InFlightTable(workers, fd=int(table_fd))
    try:
        balancer = make()  # loads the TLS files again: they may have gone since the start
    except Exception as exc:
        log.error("worker %d cannot start: %s", index, exc)
        table.close()
        return 2
    balancer.checks = None  # the supervisor checks
    balancer.follower = True
    cluster = balancer.cluster
    for bid in list(cluster.backends):
        cluster.remove(bid)  # the supervisor's snapshot brings them back, slots included
    cluster.make_backend = lambda s, clock, ss: SharedBackend(s, clock, ss, table, index)
    cluster.algorithms = worker_algorithm
    cluster.set_algorithm(cluster.algorithm)

    # the retry budget counts the requests and retries of every worker
    retries = cfg.retries
    cluster.budget = SharedRetryBudget(
        table, index, retries.budget_ratio, retries.budget_min_per_second
    )
    specs = {b.id: b for b in cfg.backends}
    conns = balancer.lab.table
    conns.next_id, conns.id_step = id_scheme(index, workers)  # ids unique across workers
    fd_chan = socket.socket(fileno=int(fd_fd))
    fd_chan.settimeout(2.0)
    state: dict[str, Any] = {"reloads": 0, "cert_reloads": 0, "listening": False}
    transport: asyncio.Transport | None = None

    def send(msg: Message) -> None:
        if transport is not None and not transport.is_closing():
            transport.write(encode(msg))

    remote = _Remote(send)
    cluster.remote = remote

    def forward(event: Event) -> None:
        """What only this worker saw (e.g. requests rescued here) goes on the timeline."""
        if event.kind in FORWARDED:
            send({"type": "event", "kind": str(event.kind), "backend": event.backend,
                  "detail": event.detail})  # fmt: skip

    balancer.subscribe(forward)

    def placed(backend: Any, slot: int) -> None:
        if isinstance(backend, SharedBackend) and backend.slot != slot:
            backend.place(slot)

    def on_message(msg: Message) -> None:
        kind = msg["type"]
        if kind == "state":
            ejected, went_down = apply_snapshot(cluster, msg, specs, placed)
            remote.ejected_ids = ejected
            for backend in went_down:
                balancer._rescue(backend)
        elif kind == "listen":
            try:  # the supervisor sent them before this message: no wait in practice
                _, fds, _, _ = socket.recv_fds(fd_chan, 16, int(msg["count"]))
            except OSError as exc:
                log.error("worker %d: no listening sockets (%s); exiting", index, exc)
                done.set()
                return
            socks = [socket.socket(fileno=fd) for fd in fds]
            for s in socks:
                s.setblocking(False)
            _in_order(_listen(socks))
        elif kind == "unlisten":
            _in_order(_unlisten())
        elif kind == "reload":
            balancer.reload()
            state["reloads"] = int(msg["generation"])
        elif kind == "certs":
            for store in balancer.tls_stores.values():
                store.reload()
            state["cert_reloads"] = int(msg["generation"])
        elif kind == "stop":
            done.set()
        elif kind == "lab":
            try:
                send(_lab_answer(balancer.lab, msg))
            except ValueError:  # over the frame limit after all: the totals, no rows
                left = len(conns)
                send({"type": "lab", "req": msg.get("req"), "left_off": left} | _totals(conns))

    ops: list[asyncio.Task[None]] = []

    def _in_order(op: Coroutine[Any, Any, None]) -> None:
        """Listen and unlisten run one after the other, in the order they were asked."""
        previous = ops[-1] if ops else None

        async def run() -> None:
            if previous is not None:
                await previous
            await op

        ops[:] = [loop.create_task(run())]

    async def _unlisten() -> None:
        await balancer.stop_listening()
        state["listening"] = False

    async def _listen(socks: list[socket.socket]) -> None:
        try:
            await balancer.start_listening(socks)
            state["listening"] = True
        except OSError as exc:
            log.error("worker %d cannot listen: %s", index, exc)
            done.set()

    ctl = socket.socket(fileno=int(ctl_fd))
    transport, _ = await loop.create_unix_connection(  # type: ignore[assignment]
        lambda: _Control(on_message, done.set), sock=ctl
    )
    loop.add_signal_handler(signal.SIGUSR1, done.set)  # the supervisor died
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        # the supervisor decides: a process-group SIGTERM must not unbind before the pair
        # has resigned, and a terminal's ^C reaches the supervisor too
        loop.add_signal_handler(sig, lambda: None)
    balancer.sweeper.start()
    on_ready()
    pid = os.getpid()
    last: dict[str, Any] = {}
    quiet = 0
    lab_sent = -1

    def tick() -> None:
        """Report the counters; a plain timer, not a task woken and cancelled each time."""
        nonlocal last, quiet, lab_sent
        if done.is_set():
            return
        timer[0] = loop.call_later(REPORT_PERIOD, tick)  # first: an error here stops nothing
        counters = report(pid, balancer.stats, cluster.backends.values(), state, cluster.budget)
        # unchanged counters are not sent again (an idle worker wakes its supervisor once a
        # second, for its CPU time and memory, not ten times)
        same = counters == last and conns.changes == lab_sent
        quiet = quiet + 1 if same else 0
        if quiet % HEARTBEAT == 0:
            last = dict(counters)
            if conns.changes != lab_sent:  # the lab's aggregates, only when they changed
                lab_sent = conns.changes
                counters["lab"] = aggregates(conns)
            usage = resource.getrusage(resource.RUSAGE_SELF)
            counters["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 3)
            counters["rss_bytes"] = _rss_bytes()
            send(counters)

    timer = [loop.call_later(0, tick)]
    await done.wait()
    timer[0].cancel()
    await balancer.stop()
    final = {**state, "final": True, "lab": aggregates(conns)}
    send(report(pid, balancer.stats, cluster.backends.values(), final, cluster.budget))
    if transport is not None:
        transport.close()
    table.close()
    fd_chan.close()
    return 0


def _lab_answer(lab: Lab, msg: Message) -> Message:
    """This worker's part of a lab request: one connection (msg["id"]) or all of them;
    TCP_INFO is read now (someone is looking), the aggregates come along."""
    out: Message = {"type": "lab", "req": msg.get("req")}
    if "id" in msg:
        out["conn"] = lab.connection(int(msg["id"]))
    else:
        view = lab.connections(closed=bool(msg.get("closed")))
        rows = view["connections"]
        out["connections"] = rows[:LAB_MAX_ROWS]
        out["closed"] = view.get("closed", [])[: max(0, LAB_MAX_ROWS - len(rows))]
        out["left_off"] = max(0, len(rows) - LAB_MAX_ROWS)
    return out | _totals(lab.table)


def _totals(table: ConnTable) -> Message:
    return {"lab": aggregates(table)}
