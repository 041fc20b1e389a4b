"""TCP mode: one client connection relayed byte for byte to one backend connection.

Pure (no asyncio, socket or ssl): the driver (`balancer.io.tcp`) feeds events in and the
relay acts through two `End`s (the client's and the backend's transport) and the
context's `open` (start a connection to a backend). The life of a relay:

1. **preface**: when the listener accepts PROXY headers from the client's address, the
   header is read first (required; malformed: closed); when some backend has `sni=`, the
   ClientHello's server name is read (without terminating TLS). Both are bounded in bytes
   and in time (`timeouts.client_hello`).
2. **connecting**: `Cluster.pick` over the eligible backends (for SNI routing, those whose
   names match, else those without `sni=`); a refused or timed-out connect is retried on
   another backend (the same one when it is the only one) within `retries.attempts`.
   Bytes the client sends meanwhile are held (reading pauses past `HOLD_HIGH`).
3. **open**: bytes both ways; a FIN from one side is passed on (`write_eof`) and the
   other direction keeps flowing; when both sides have sent theirs, both close. A reset
   on one side aborts the other. Backpressure both ways: a side whose transport buffers
   too much (`pause_writing`) stops reading on the other side.
4. **closed**: counters on the backend (connections, bytes, seconds), one access-log
   line, the outcome to outlier detection.

Idle: no byte either way for `timeouts.tcp_idle` closes both sides (the sweeper checks).
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable
from typing import Protocol

from balancer.config import Config, ListenerSettings
from balancer.lab.table import ConnTable
from balancer.lb.cluster import Backend, Cluster
from balancer.tcp import proxy
from balancer.tcp.clienthello import (
    MAX_BUFFER,
    UNRECOGNIZED_NAME_ALERT,
    read_client_hello,
    sni_matches,
)

HOLD_HIGH = 256 * 1024  # client bytes held while connecting before reading pauses
# A TLS client's bytes are kept until the backend's first byte, up to this much, so a
# backend lost before it answered (a balancer killed mid-handshake, the VIP moving) is
# tried again with them: the server speaks before any request can have been processed.
REPLAY_MAX = 16 * 1024
TLS_HANDSHAKE = 0x16  # the content type of a TLS record that starts a connection

# states
PREFACE, CONNECTING, OPEN, CLOSED = "preface", "connecting", "open", "closed"
# a PROXY header: none expected, required (a trusted source), refused (any other source
# of a listener with accept_proxy)
NO_PROXY, REQUIRE_PROXY, REFUSE_PROXY = 0, 1, 2


class End(Protocol):
    """What the relay needs of one side's transport."""

    def write(self, data: bytes) -> None: ...
    def write_eof(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class TcpStats:
    __slots__ = ("bytes_in", "bytes_out", "connections_open", "connections_total", "refused")

    def __init__(self) -> None:
        self.connections_total = 0
        self.connections_open = 0
        self.refused = 0  # closed before reaching a backend (hostile preface, no backend)
        self.bytes_in = 0
        self.bytes_out = 0


class TcpContext:
    """What the relays of one TCP listener share."""

    def __init__(
        self,
        cfg: Config,
        listener: ListenerSettings,
        cluster: Cluster,
        *,
        clock: Callable[[], float],
        open: Callable[[Relay, Backend, float, float], None],
        access_log: Callable[[str], None] | None = None,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        self.cluster = cluster
        self.clock = clock
        # the driver: connect to the backend within the timeout, after the delay, given
        self.open = open
        self.access_log = access_log
        self.wallclock = wallclock
        self.listener = listener
        self.trusted = tuple(ipaddress.ip_network(c, strict=False) for c in listener.accept_proxy)
        self.relays: set[Relay] = set()
        # the network lab's records, shared with the HTTP listener (set by the wiring)
        self.conns: ConnTable | None = None
        self.stats = TcpStats()
        self.draining = False
        self.now = clock()
        self.reconfigure(cfg)

    def reconfigure(self, cfg: Config) -> None:
        self.cfg = cfg
        self.timeouts = cfg.timeouts
        self.limits = cfg.limits
        self.attempts = cfg.retries.attempts
        self.retry_interval = cfg.retries.interval
        self.hash_sni = cfg.hash_key == "sni"
        self.sni_routing = any(b.sni for b in cfg.backends)
        self.proxy_of = {b.id: cfg.backend_proxy(b) for b in cfg.backends}
        self.default_proxy = cfg.proxy_protocol
        self.sni_of = {b.id: b.sni for b in cfg.backends}

    def excluded_for(self, sni: str | None) -> tuple[str, ...]:
        """The backends a connection with this server name may not use: with SNI routing,
        the exact matches win, then `*.suffix` ones, then the backends without `sni=`."""
        backends = self.cluster.backends
        names = {bid: self.sni_of.get(bid) for bid in backends}
        groups: list[set[str]] = [set(), set(), set()]
        for bid, patterns in names.items():
            if not patterns:
                groups[2].add(bid)
            elif sni is not None:
                if sni in patterns:
                    groups[0].add(bid)
                elif any(p.startswith("*.") and sni_matches(p, sni) for p in patterns):
                    groups[1].add(bid)
        chosen = next((g for g in groups if g), set())
        return tuple(bid for bid in backends if bid not in chosen)

    def sweep(self, now: float) -> None:
        self.now = now
        for relay in list(self.relays):
            relay.sweep(now)


class Relay:
    """One client connection in TCP mode (see the module doc)."""

    __slots__ = (
        "active",
        "backend",
        "backend_end",
        "backend_eof",
        "backend_paused",
        "buf",
        "bytes_in",
        "bytes_out",
        "client",
        "client_addr",
        "client_eof",
        "client_paused",
        "connected_at",
        "ctx",
        "deadline",
        "excluded",
        "local",
        "must_read",
        "outcome",
        "peer",
        "replay",
        "sni",
        "started",
        "state",
        "tried",
    )

    def __init__(
        self, ctx: TcpContext, client: End, peer: tuple[str, int], local: tuple[str, int]
    ) -> None:
        self.ctx = ctx
        self.client = client
        self.peer = peer  # the socket's peer; the PROXY header may replace `client_addr`
        self.client_addr = peer
        self.local = local
        self.backend: Backend | None = None
        self.backend_end: End | None = None
        self.buf = bytearray()  # client bytes not yet sent to a backend
        # client bytes sent to a backend that has not answered yet (TLS only, see REPLAY_MAX);
        # None once it answered, or when the client does not start with a TLS handshake
        self.replay: bytearray | None = bytearray()
        self.client_eof = False
        self.backend_eof = False
        self.client_paused = False  # we paused reading the client
        self.backend_paused = False
        self.bytes_in = 0  # client -> backend
        self.bytes_out = 0  # backend -> client
        self.tried: list[str] = []
        self.excluded: tuple[str, ...] = ()
        self.sni: str | None = None
        self.active = False
        self.outcome = ""
        self.started = ctx.clock()
        self.connected_at = 0.0
        self.state = PREFACE
        self.deadline = ctx.now + ctx.timeouts.client_hello
        # (what to do about a PROXY header, whether a ClientHello is still to read)
        screen = NO_PROXY
        if ctx.trusted:
            screen = REQUIRE_PROXY if proxy.trusted(peer[0], ctx.trusted) else REFUSE_PROXY
        self.must_read = (screen, ctx.sni_routing)
        stats = ctx.stats
        stats.connections_total += 1
        stats.connections_open += 1
        ctx.relays.add(self)
        if ctx.draining or len(ctx.relays) > ctx.limits.max_client_connections:
            self._refuse("overload")
            return
        if self.must_read == (NO_PROXY, False):
            self._connect()

    # client events ---------------------------------------------------------------------
    def client_data(self, data: bytes) -> None:
        end = self.backend_end
        if end is not None:  # the hot path
            self.bytes_in += len(data)
            self.active = True
            if self.replay is not None:
                self._keep(data)
            end.write(data)
            return
        if self.state == CLOSED:
            return
        self.buf += data
        if self.state == PREFACE:
            self._preface()
        elif len(self.buf) > HOLD_HIGH and not self.client_paused:
            self.client_paused = True
            self.client.pause_reading()

    def client_eof_received(self) -> None:
        self.client_eof = True
        if self.state == PREFACE:
            self._refuse("client closed before its preface")
        elif self.backend_end is not None:
            self.backend_end.write_eof()
            if self.backend_eof:
                self._finish("closed")

    def client_lost(self, error: bool) -> None:
        if self.state != CLOSED:
            self._finish("client reset" if error else "closed", abort_backend=error)

    def client_pause_writing(self) -> None:
        # the client reads slower than the backend sends
        if self.backend_end is not None and not self.backend_paused:
            self.backend_paused = True
            self.backend_end.pause_reading()

    def client_resume_writing(self) -> None:
        if self.backend_end is not None and self.backend_paused:
            self.backend_paused = False
            self.backend_end.resume_reading()

    # backend events --------------------------------------------------------------------
    def backend_connected(self, end: End) -> None:
        if self.state != CONNECTING:
            end.close()  # the client left while we connected
            return
        backend = self.backend
        assert backend is not None
        self.state = OPEN
        self.backend_end = end
        self.connected_at = self.ctx.clock()
        backend.tcp_connections += 1
        version = self.ctx.proxy_of.get(backend.id, self.ctx.default_proxy)
        head = proxy.encode(version, self.client_addr, self.local) if version else b""
        if self.buf and self.replay is not None:
            self._keep(bytes(self.buf))
        if self.buf or head:
            data, self.buf = head + bytes(self.buf), bytearray()
            self.bytes_in += len(data) - len(head)
            end.write(data)
        if self.client_eof:
            end.write_eof()
        if self.client_paused:
            self.client_paused = False
            self.client.resume_reading()
        self.deadline = self.ctx.now + self.ctx.timeouts.tcp_idle

    def connect_failed(self, kind: str) -> None:
        """`kind`: "connect" (refused, unreachable) or "timeout"."""
        backend = self.backend
        if self.state != CONNECTING or backend is None:
            return
        ctx = self.ctx
        backend.in_flight -= 1
        backend.errors_connect += 1
        ctx.cluster.failure(backend, kind)
        self.backend = None
        if len(self.tried) < ctx.attempts:
            backend.retries += 1
            self._connect()
        else:
            self._refuse(f"backend {kind} failed")

    def _keep(self, data: bytes) -> None:
        replay = self.replay
        assert replay is not None
        if (not replay and data[0] != TLS_HANDSHAKE) or len(replay) + len(data) > REPLAY_MAX:
            self.replay = None  # not TLS, or too much to hold: never replayed
        else:
            replay += data

    def backend_data(self, data: bytes) -> None:
        self.replay = None  # the backend answered: a retry could repeat what it did
        self.bytes_out += len(data)
        self.active = True
        self.client.write(data)

    def backend_eof_received(self) -> None:
        self.backend_eof = True
        self.client.write_eof()
        if self.client_eof:
            self._finish("closed")

    def backend_lost(self, error: bool) -> None:
        if self.state != OPEN:
            return
        replay, backend = self.replay, self.backend
        if replay and backend is not None and not self.client_eof:
            if len(self.tried) < self.ctx.attempts:
                self._again(backend, replay)
                return
        self._finish("backend reset" if error else "closed", abort_client=error)

    def _again(self, backend: Backend, replay: bytearray) -> None:
        """The backend went before it answered our TLS client: connect again, send it all."""
        backend.in_flight -= 1
        backend.errors_connect += 1
        backend.retries += 1
        self.ctx.cluster.failure(backend, "connect")
        self.backend = self.backend_end = None
        self.bytes_in -= len(replay)
        self.buf = replay + self.buf
        self.replay = bytearray()
        self.state = CONNECTING
        self._connect()

    def backend_pause_writing(self) -> None:
        if not self.client_paused:
            self.client_paused = True
            self.client.pause_reading()

    def backend_resume_writing(self) -> None:
        if self.client_paused:
            self.client_paused = False
            self.client.resume_reading()

    # deadlines --------------------------------------------------------------------------
    def sweep(self, now: float) -> None:
        state = self.state
        if state == OPEN:
            if self.active:
                self.active = False
                self.deadline = now + self.ctx.timeouts.tcp_idle
            elif now >= self.deadline:
                self._finish("idle timeout")
        elif state == PREFACE and now >= self.deadline:
            self._refuse("preface timeout")

    def shutdown(self) -> None:
        """The balancer stops and its grace is over: close both sides."""
        self._finish("shutdown")

    # inside -----------------------------------------------------------------------------
    def _preface(self) -> None:
        screen, want_hello = self.must_read
        if screen == REFUSE_PROXY:
            if proxy.looks_like_header(self.buf) is None:
                return  # too few bytes to tell
            if proxy.looks_like_header(self.buf):
                self._refuse(f"PROXY header from {self.peer[0]}, not in accept_proxy")
                return
            self.must_read = (NO_PROXY, want_hello)
        elif screen == REQUIRE_PROXY:
            header = proxy.parse(bytes(self.buf))
            if header.status == "more":
                return
            if header.status == "invalid":
                self._refuse(f"PROXY header: {header.reason}")
                return
            if header.source is not None:
                self.client_addr = header.source
            del self.buf[: header.consumed]
            self.must_read = (NO_PROXY, want_hello)
        if want_hello:
            hello = read_client_hello(bytes(self.buf))
            if hello.status == "more":
                if len(self.buf) > MAX_BUFFER:
                    self._refuse("ClientHello too large")
                return
            if hello.status == "invalid":
                self._refuse(f"ClientHello: {hello.reason}")
                return
            self.sni = hello.sni
            self.must_read = (NO_PROXY, False)
        self._connect()

    def _connect(self) -> None:
        ctx = self.ctx
        if self.state == PREFACE:
            self.state = CONNECTING
            if ctx.sni_routing:
                self.excluded = ctx.excluded_for(self.sni)
        key = self.sni.encode() if ctx.hash_sni and self.sni else self.client_addr[0].encode()
        backend = ctx.cluster.pick(key, self.excluded + tuple(self.tried))
        if backend is None and self.tried:
            backend = ctx.cluster.pick(key, self.excluded)  # the only one left: again
        if backend is None:
            if ctx.sni_routing and len(self.excluded) == len(ctx.cluster.backends):
                self.client.write(UNRECOGNIZED_NAME_ALERT)
                self._refuse(f"no backend for server name {self.sni!r}")
            else:
                self._refuse("no backend available")
            return
        # the same backend again (the only one left): give it a moment, e.g. a VIP moving
        delay = ctx.retry_interval if backend.id in self.tried else 0.0
        self.backend = backend
        self.tried.append(backend.id)
        backend.in_flight += 1  # least connections counts open connections
        ctx.open(self, backend, ctx.timeouts.connect, delay)

    def _refuse(self, reason: str) -> None:
        self.ctx.stats.refused += 1
        self._finish(reason)

    def _finish(
        self, outcome: str, abort_client: bool = False, abort_backend: bool = False
    ) -> None:
        if self.state == CLOSED:
            return
        connected = self.state == OPEN
        self.state = CLOSED
        self.outcome = outcome
        ctx = self.ctx
        ctx.relays.discard(self)
        stats = ctx.stats
        stats.connections_open -= 1
        stats.bytes_in += self.bytes_in
        stats.bytes_out += self.bytes_out
        now = ctx.clock()
        backend = self.backend
        if backend is not None:
            backend.in_flight -= 1
            if connected:
                backend.tcp_bytes_in += self.bytes_in
                backend.tcp_bytes_out += self.bytes_out
                backend.tcp_seconds += now - self.connected_at
                ctx.cluster.success(backend)
        end = self.backend_end
        if end is not None:
            end.abort() if abort_backend else end.close()
        self.client.abort() if abort_client else self.client.close()
        if ctx.access_log is not None:
            ctx.access_log(self.log_line(now))

    def log_line(self, now: float) -> str:
        """The connection's access-log line (JSON), written when it closes."""
        b = self.backend
        return json.dumps(
            {
                "ts": self.ctx.wallclock(),
                "mode": "tcp",
                "client": self.client_addr[0],
                "client_port": self.client_addr[1],
                "sni": self.sni,
                "backend": b.id if b is not None else None,
                "backend_address": b.address if b is not None else None,
                "duration_ms": round((now - self.started) * 1000, 3),
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "attempts": len(self.tried),
                "outcome": self.outcome,
            },
            separators=(",", ":"),
        )
