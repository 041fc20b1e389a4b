"""Helpers for tests and drills that need real backends.

``run_backend`` runs one in the current event loop (fast, in-process); ``spawn_backend_process``
runs ``python -m backends`` as a child process, for drills that SIGKILL or SIGSTOP it.
"""

from __future__ import annotations

import http.client
import os
import select
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import IO, Any

from aiohttp import web

from backends.app import make_app, set_healthy

_START_TIMEOUT_S = 10.0
_POLL_INTERVAL_S = 0.05


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

    def set_healthy(self, healthy: bool) -> None:
        set_healthy(self.app, healthy)


@asynccontextmanager
async def run_backend(
    name: str,
    host: str = "127.0.0.1",
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


class BackendProcess(subprocess.Popen[bytes]):
    """A ``python -m backends`` child; ``host``/``port``/``url`` are set once it is ready."""

    name: str = ""
    host: str = ""
    port: int = 0
    url: str = ""


def _read_line(stream: IO[bytes], deadline: float) -> bytes:
    """Read one line from a pipe without blocking past ``deadline``."""
    fd = stream.fileno()
    data = b""
    while b"\n" not in data and len(data) < 4096:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


def _healthz(host: str, port: int, ctx: ssl.SSLContext | None, timeout: float) -> int | None:
    conn: http.client.HTTPConnection
    if ctx is None:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    else:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def spawn_backend_process(
    name: str,
    port: int = 0,
    host: str = "127.0.0.1",
    *,
    delay_ms: int = 0,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
    ca_file: str | os.PathLike[str] | None = None,
    keepalive_timeout: float | None = None,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout: float = _START_TIMEOUT_S,
    **popen_kw: Any,
) -> BackendProcess:
    """Start ``python -m backends`` and wait (at most ``timeout`` s) until /healthz answers.

    With TLS, ``ca_file`` is the CA that signed ``tls_cert``; the readiness probe verifies
    against it. The caller owns the process: terminate/kill and ``wait()`` it when done.
    Raises RuntimeError (with the child's stderr) when it exits or does not become ready.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together")
    if tls_cert is not None and ca_file is None:
        raise ValueError("a TLS backend needs ca_file so the readiness probe can verify it")
    cmd = [sys.executable, "-m", "backends", "--host", host, "--port", str(port)]
    cmd += ["--name", name, "--delay-ms", str(delay_ms)]
    if tls_cert is not None and tls_key is not None:
        cmd += ["--tls-cert", os.fspath(tls_cert), "--tls-key", os.fspath(tls_key)]
    if keepalive_timeout is not None:
        cmd += ["--keepalive-timeout", str(keepalive_timeout)]
    cmd += list(extra_args)
    child_env = dict(os.environ if env is None else env)
    # The child must import this checkout's package even when run from another directory.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, child_env.get("PYTHONPATH", "")) if p
    )
    ctx = None
    if ca_file is not None:
        ctx = ssl.create_default_context(cafile=os.fspath(ca_file))

    # stderr goes to an unlinked temp file: never blocks the child, readable on failure.
    with tempfile.TemporaryFile() as errlog:
        popen_kw.setdefault("stderr", errlog)
        proc = BackendProcess(cmd, stdout=subprocess.PIPE, env=child_env, **popen_kw)
        deadline = time.monotonic() + timeout
        try:
            assert proc.stdout is not None
            line = _read_line(proc.stdout, deadline).decode("utf-8", "replace").strip()
            # The child prints one line, "backend NAME listening on URL", when bound.
            url = line.rsplit(" ", 1)[-1] if " listening on " in line else ""
            if not url:
                raise RuntimeError(f"backend {name} did not report its address: {line!r}")
            bound_port = int(url.rsplit(":", 1)[1])
            status = None
            while status != 200 and time.monotonic() < deadline and proc.poll() is None:
                status = _healthz(host, bound_port, ctx, max(0.1, deadline - time.monotonic()))
                if status != 200:
                    time.sleep(_POLL_INTERVAL_S)
            if status != 200:
                raise RuntimeError(f"backend {name} /healthz not ready (last status {status})")
        except BaseException as exc:
            proc.kill()
            proc.wait()
            _close(proc)
            errlog.seek(0)
            err = errlog.read(4000).decode("utf-8", "replace").strip()
            if isinstance(exc, RuntimeError | ValueError):
                raise RuntimeError(f"{exc}; exit={proc.returncode}; stderr: {err}") from None
            raise
    _close(proc)
    proc.name, proc.host, proc.port, proc.url = name, host, bound_port, url
    return proc


def _close(proc: BackendProcess) -> None:
    # Nothing more is written to stdout after the ready line; close our end of the pipe.
    if proc.stdout is not None:
        proc.stdout.close()


_BUSY_LOOP = (
    "import sys, time\n"
    "end = time.monotonic() + float(sys.argv[1])\n"
    "while time.monotonic() < end:\n"
    "    pass\n"
)


@contextmanager
def cpu_load(seconds: float = 120.0, processes: int | None = None) -> Iterator[int]:
    """Keep the machine busy: one busy-loop process per core (or ``processes``) while the block
    runs, as on a loaded CI machine. Each loop also ends by itself after ``seconds``; the block
    always kills them. Yields how many run."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(processes or os.cpu_count() or 1):
            procs.append(subprocess.Popen([sys.executable, "-c", _BUSY_LOOP, str(seconds)]))
        yield len(procs)
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
