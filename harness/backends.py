"""Demo backends: in the test's event loop (`run_backend`) or as `python -m backends`
child processes (`start_backend`), for tests and drills that SIGKILL or SIGSTOP them."""

from __future__ import annotations

import os
import re
import ssl
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from backends import BACKEND_HEADER
from backends.app import make_app, set_healthy
from harness.http import probe
from harness.procs import HOST, Child, listener_problem

START_TIMEOUT_S = 15.0
_READY = re.compile(r"^backend (\S+) listening on (https?)://(\S+):(\d+)$", re.MULTILINE)


def _url(scheme: str, host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"


@dataclass
class RunningBackend:
    """An in-process backend started by :func:`run_backend`."""

    name: str
    host: str
    port: int
    url: str
    app: web.Application

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def set_healthy(self, healthy: bool) -> None:
        set_healthy(self.app, healthy)


@asynccontextmanager
async def run_backend(
    name: str,
    host: str = HOST,
    port: int = 0,
    *,
    delay_ms: int = 0,
    ssl_context: ssl.SSLContext | None = None,
    keepalive_timeout: float = 75.0,
    shutdown_timeout: float = 2.0,
) -> AsyncIterator[RunningBackend]:
    """Serve a backend on ``host:port`` (0 = a free port) until the block exits."""
    app = make_app(name, delay_ms)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        keepalive_timeout=keepalive_timeout,
        shutdown_timeout=shutdown_timeout,
        access_log=None,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        bound_port = int(runner.addresses[0][1])
        scheme = "https" if ssl_context is not None else "http"
        yield RunningBackend(name, host, bound_port, _url(scheme, host, bound_port), app)
    finally:
        await runner.cleanup()


class BackendProc(Child):
    """`python -m backends --name NAME`; `port`/`url` are known once `start()` returned.

    Ready means: it printed "backend NAME listening on URL", /healthz answers 200 with
    ``X-Backend: NAME`` and every socket listening on its port is its own. With TLS,
    `ca_file` is the CA that signed the certificate: the probe verifies against it.
    """

    def __init__(
        self,
        name: str,
        log: Path,
        *,
        host: str = HOST,
        port: int = 0,
        delay_ms: int = 0,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        keepalive_timeout: float | None = None,
        shutdown_timeout: float | None = None,
        extra_args: Sequence[str] = (),
        start_timeout: float = START_TIMEOUT_S,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if tls_cert is not None and ca_file is None:
            raise ValueError("a TLS backend needs ca_file so the readiness probe can verify it")
        argv = [sys.executable, "-m", "backends", "--host", host, "--port", str(port)]
        argv += ["--name", name, "--delay-ms", str(delay_ms)]
        if tls_cert is not None and tls_key is not None:
            argv += ["--tls-cert", os.fspath(tls_cert), "--tls-key", os.fspath(tls_key)]
        if keepalive_timeout is not None:
            argv += ["--keepalive-timeout", str(keepalive_timeout)]
        if shutdown_timeout is not None:
            argv += ["--shutdown-timeout", str(shutdown_timeout)]
        super().__init__(name, [*argv, *extra_args], log)
        self.host = host
        self.port = port
        self.scheme = "https" if tls_cert is not None else "http"
        self.start_timeout = start_timeout
        self._ctx = None if ca_file is None else ssl.create_default_context(cafile=ca_file)

    @property
    def url(self) -> str:
        return _url(self.scheme, self.host, self.port)

    @property
    def address(self) -> str:
        """host:port, the backend's id in the balancer's /api/state."""
        return f"{self.host}:{self.port}"

    def start(self) -> BackendProc:
        """Start (or restart, on the same port once it is known) and wait until ready."""
        self.start_nowait()
        self.wait_until_ready()
        return self

    def start_nowait(self) -> BackendProc:
        """Start without waiting (a drill measures how long the balancer takes to notice)."""
        self._pin_port()
        super().start()
        return self

    def wait_until_ready(self) -> None:
        """Raise StartError (with the log) unless it is ready within `start_timeout`."""
        self.wait_ready(self._ready, self.start_timeout)

    def _pin_port(self) -> None:
        # a restart must come back where the balancer expects it
        self.argv[self.argv.index("--port") + 1] = str(self.port)

    def _ready(self) -> str | None:
        found = [m for m in _READY.finditer(self.output()) if m.group(1) == self.name]
        if not found:
            return "no 'listening on' line yet"
        port = int(found[-1].group(4))
        if self.port not in (0, port):
            return f"it reports port {port}, not {self.port}"
        problem = probe(
            self.host, port, "/healthz", ctx=self._ctx, header=(BACKEND_HEADER, self.name)
        )
        if problem is None:
            problem = listener_problem(self, port)
        if problem is None:
            self.port = port  # a restart reuses it
        return problem
