"""Active checks: the asyncio driver around the pure `HealthChecker`.

A check is a raw HTTP/1.1 GET on its own short-lived connection (TLS verified
against our CA when the balancer re-encrypts), so it never shares fate with a
pooled data-path connection.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

from balancer.config import HealthCheckSettings
from balancer.events import EventKind
from balancer.lb.cluster import Backend, Cluster
from balancer.lb.health import HealthChecker
from balancer.tcp.proxy import encode_local

log = logging.getLogger("balancer.checks")


async def probe(
    host: str,
    port: int,
    path: str,
    timeout: float,
    ssl_ctx: ssl.SSLContext | None = None,
    server_name: str | None = None,
    preface: bytes = b"",
) -> tuple[bool, str]:
    """One check: (ok, detail). 2xx/3xx is healthy. `preface`: a PROXY header (LOCAL) for a
    backend that requires one (plain HTTP only)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host,
                port,
                ssl=ssl_ctx,
                server_hostname=(server_name or host) if ssl_ctx is not None else None,
            )
            writer.write(
                preface
                + f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "User-Agent: lb-testbed-check\r\nConnection: close\r\n\r\n".encode()
            )
            line = await reader.readline()
    except TimeoutError:
        return False, "timeout"
    except ssl.SSLError as exc:
        return False, f"tls: {exc.reason or exc}"
    except OSError as exc:
        return False, f"connect: {exc.strerror or exc}"
    finally:
        if writer is not None:
            writer.close()
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return False, "invalid response"
    status = int(parts[1])
    return 200 <= status < 400, f"HTTP {status}"


async def probe_tcp(host: str, port: int, timeout: float, preface: bytes = b"") -> tuple[bool, str]:
    """A TCP check: the backend accepts a connection within `timeout`."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(asyncio.Protocol, host, port)
    except TimeoutError:
        return False, "timeout"
    except OSError as exc:
        return False, f"connect: {exc.strerror or exc}"
    if preface:
        transport.write(preface)  # type: ignore[attr-defined]
    transport.close()
    return True, "connected"


class ActiveChecks:
    """One task per backend, running its `HealthChecker`."""

    def __init__(
        self,
        cluster: Cluster,
        settings: HealthCheckSettings,
        emit: Callable[[EventKind, str, str], None],
        ssl_ctx: ssl.SSLContext | None = None,
        server_name: str | None = None,
        on_down: Callable[[Backend], None] | None = None,
        proxy_of: Callable[[str], str | None] = lambda backend_id: None,
    ) -> None:
        self.cluster = cluster
        self.proxy_of = proxy_of  # a backend's PROXY protocol version, or None
        self.on_down = on_down
        self.config = settings
        self.emit = emit
        self.ssl_ctx = ssl_ctx
        self.server_name = server_name
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.checkers: dict[str, HealthChecker] = {}

    def sync(self) -> None:
        """Start checks for new backends and stop those of removed ones."""
        for bid in list(self.tasks):
            if bid not in self.cluster.backends:
                self.tasks.pop(bid).cancel()
                self.checkers.pop(bid, None)
        for bid, backend in self.cluster.backends.items():
            if bid not in self.tasks:
                self.tasks[bid] = asyncio.get_running_loop().create_task(self._run(backend))

    async def stop(self) -> None:
        tasks = list(self.tasks.values())
        self.tasks.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, backend: Backend) -> None:
        loop = asyncio.get_running_loop()
        checker = HealthChecker(self.config, loop.time(), initially_up=backend.check_up)
        self.checkers[backend.id] = checker
        cluster = self.cluster
        delay = checker.next_delay()
        while True:
            await asyncio.sleep(delay)
            started = loop.time()
            version = self.proxy_of(backend.id)
            preface = encode_local(version) if version is not None else b""
            if self.config.type == "tcp":
                ok, detail = await probe_tcp(
                    backend.host, backend.port, self.config.timeout, preface
                )
            else:
                ok, detail = await probe(
                    backend.host,
                    backend.port,
                    self.config.path,
                    self.config.timeout,
                    self.ssl_ctx,
                    self.server_name,
                    preface,
                )
            now = loop.time()
            backend.check_duration = now - started
            first = backend.last_check is None
            backend.last_check = ok
            backend.check_detail = detail
            if ok:
                # Envoy's rule: a passing active check ends a passive ejection
                if cluster.outlier.is_ejected(backend.id, now):
                    cluster.outlier.uneject(backend.id)
                    cluster.invalidate()
                    self.emit(EventKind.RECOVERED, backend.id, "ejection lifted by a passing check")
            transition = checker.on_result(ok, now, detail)
            # a timeout already waited a whole check timeout: confirm at once, not later
            delay = 0.0 if detail == "timeout" and checker.up else checker.next_delay()
            if transition is not None:
                backend.check_up = checker.up
                backend.up_since = now if checker.up else None
                cluster.invalidate()
                self.emit(EventKind.UP if checker.up else EventKind.DOWN, backend.id, detail)
                log.info(
                    "backend %s is %s (%s)", backend.id, "up" if checker.up else "down", detail
                )
                if not checker.up and self.on_down is not None:
                    self.on_down(backend)
            elif first and ok and checker.up:
                # a backend starts up; its first passing check is no transition, but a page
                # opened at start-up should see the checks pass
                self.emit(EventKind.UP, backend.id, f"first check passed ({detail})")
